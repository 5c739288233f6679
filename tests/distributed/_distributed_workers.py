"""Worker functions for the torch.distributed tests (CPU, gloo), and the spawn that runs them.

``torch.multiprocessing.spawn`` pickles a worker by module and name, so the workers live here, at module
level; the spawned interpreters get the parent's ``sys.path`` (multiprocessing's preparation data), which
holds this folder (pytest's rootdir-relative insertion) and the installed ``peftlite``. Each worker
asserts on its own rank: a failure comes back to pytest as the rank's traceback, and the other ranks are
stopped. A spawn costs most of its time in starting interpreters, so each spawn runs many checks.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import peftlite
from peftlite.layers import adapted_layers
from peftlite.state import wrap_state
from peftlite.wrapping import saved_tensors

WORLD = 2


# ---- the spawn --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, out_dir: str, timeout: float = 120.0, nprocs: int = WORLD) -> list[dict]:
    """Run ``worker(rank, nprocs, port, out_dir)`` on ``nprocs`` processes; return each rank's report.

    A worker writes its report (a JSON dict) to ``out_dir/rank<r>.json``. Past ``timeout`` seconds every
    process still running is killed and TimeoutError is raised.
    """
    import torch.multiprocessing as mp

    folder = os.path.dirname(os.path.abspath(__file__))
    if folder not in sys.path:  # the children import this module by name
        sys.path.insert(0, folder)
    context = mp.start_processes(worker, args=(nprocs, free_port(), str(out_dir)), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{worker.__name__}: {nprocs} processes still running after {timeout:.0f} s; killed")
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(nprocs)]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int):
    torch.set_num_threads(1)  # two processes on a small CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def report(out_dir: str, rank: int, values: dict) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(values, f)


def max_rel_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (0 for two zero tensors)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def file_errors(path_a, path_b, bitwise: bool = False) -> tuple[float, dict, dict]:
    """The largest relative error between the tensors of two adapter files (with ``bitwise``, 1.0 when
    any tensor differs in a bit, else 0.0), and their configs.

    Files are compared by content, not bytes: safetensors writes its metadata map in a per-process order.
    """
    from safetensors import safe_open

    def read(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["peftlite"])

    (ta, ca), (tb, cb) = read(path_a), read(path_b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))
    if bitwise:
        return float(not all(torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)) for k in ta)), ca, cb
    return max(max_rel_error(ta[k], tb[k]) for k in ta), ca, cb


def batches(steps: int, size: int, classes: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(steps)]


def half(t: Tensor, rank: int, world: int) -> Tensor:
    """This rank's rows of a global batch (equal parts, so the mean of the means is the global mean)."""
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def sgd_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---- DDP ----------------------------------------------------------------------------------------------

DDP_STEPS, DDP_BATCH, DDP_LR = 5, 16, 0.1


def ddp_checks(rank: int, world: int, port: int, out_dir: str) -> None:
    """A LoRA tiny ResNet (conv adapters, a new head) trained under DistributedDataParallel.

    Checks: the reducer holds exactly the trainable tensors (adapters and head), no frozen one; the
    frozen parameters get no gradient; after the steps every trainable tensor is bitwise equal across
    ranks; rank 0's file matches single-process training on the whole batch; rank 1 loads that file
    into a fresh model and gets rank 1's outputs bit for bit.
    """
    from peftlite.demo.digits import tiny_resnet

    with process_group(rank, world, port):
        torch.manual_seed(0)
        base = tiny_resnet(5, width=8).eval()
        model = peftlite.wrap(copy.deepcopy(base), "layer*", rank=2, heads={"fc": nn.Linear(32, 5)})
        reference = copy.deepcopy(model)  # trained alone on the whole batch
        ddp = nn.parallel.DistributedDataParallel(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]

        logging_data = ddp._get_ddp_logging_data()
        buckets = ddp.reducer._get_zeros_like_grad_buckets()
        in_buckets = {id(p) for b in buckets for p in b.parameters()}
        assert logging_data["num_parameter_tensors"] == len(trainable), logging_data
        assert logging_data["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in trainable)
        assert in_buckets == {id(p) for p in trainable}, "the reducer's buckets are not the trainable tensors"
        assert sum(b.buffer().numel() for b in buckets) == sum(p.numel() for p in trainable)

        optimizer = torch.optim.SGD(trainable, lr=DDP_LR)
        reference_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=DDP_LR)
        for x, y in batches(DDP_STEPS, DDP_BATCH, 5):
            sgd_step(ddp, half(x, rank, world), half(y, rank, world), optimizer)
            assert all(p.grad is None for p in frozen), "a frozen parameter got a gradient"
            sgd_step(reference, x, y, reference_optimizer)

        flat = torch.cat([p.detach().reshape(-1) for p in trainable])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(g.view(torch.int32), gathered[0].view(torch.int32)) for g in gathered)
        assert identical, "the trainable tensors differ across ranks"

        path = os.path.join(out_dir, "ddp.safetensors")
        if rank == 0:
            peftlite.save(model, path)  # DDP's module: its tensors are whole on every rank, no collective
            peftlite.save(reference, os.path.join(out_dir, "single.safetensors"))
        dist.barrier()
        error, config, reference_config = file_errors(path, os.path.join(out_dir, "single.safetensors"))
        assert config == reference_config
        assert error < 1e-5, f"DDP and single-process training differ by {error:.2e} (relative)"
        x = batches(1, 8, 5, seed=1)[0][0]
        loaded = peftlite.load(copy.deepcopy(base), path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model.eval()(x)), "the loaded file computes other outputs"
        report(out_dir, rank, {"trainable": sum(p.numel() for p in trainable),
                               "frozen": sum(p.numel() for p in frozen),
                               "bucket_sizes": logging_data["bucket_sizes"], "max_rel_error": error})


# ---- FSDP2 --------------------------------------------------------------------------------------------

class Block(nn.Module):
    """A pre-norm transformer block: attention and an MLP, each behind a LayerNorm and a residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, C)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A conv stem (16x16 -> 4x4 tokens), transformer blocks, a strided conv over the token map, a head.

    Its three convs take the three ways an adapted conv trains (``conv.training_path``) at 4 samples a
    rank: ``dense`` (stem.0), ``merged`` (stem.2) and ``activations`` (pool).
    """

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 4, stride=4), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.blocks = nn.ModuleList(Block(dim, 2) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 16, 16) -> (N, classes)
        x = self.stem(x)  # (N, C, 4, 4)
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, 16, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.pool(x).mean((2, 3)))


FSDP_TARGETS = ["stem", "blocks.*.attn", "blocks.*.fc1", "blocks.*.fc2", "pool"]
FSDP_STEPS, FSDP_BATCH, FSDP_LR = 3, 8, 0.1


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT()


def lora_vit() -> nn.Module:
    """The wrapped TinyViT: adapters on the conv stem, the attention (q/k/v and out_proj) and the MLPs
    (rank 3: the A tensors shard unevenly over 2 ranks), a new 5-class head (5 rows: uneven too)."""
    torch.manual_seed(1)
    model = peftlite.wrap(tiny_vit(), FSDP_TARGETS, rank=3, heads={"head": nn.Linear(16, 5)})
    with torch.no_grad():  # B != 0, so that the adapters change the outputs from the start
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.1)
    return model


def conv_paths(model: nn.Module, samples: int) -> dict[str, str]:
    """The way each adapted conv of a TinyViT trains at ``samples`` per rank (16x16 inputs)."""
    from peftlite.functional import ConvGeometry
    from peftlite.layers.conv import training_path

    sizes = {"stem.0": 16, "stem.2": 4, "pool": 4}  # input height and width
    out = {}
    for name, size in sizes.items():
        conv = model.get_submodule(name)
        geom = ConvGeometry.of(conv)
        out[name] = training_path(geom, 3, geom.output_pixels((samples, conv.in_channels, size, size)))
    return out


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 as its docs show it: each block, then the root (which takes the stem, the norm and the head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp_checks(rank: int, world: int, port: int, out_dir: str) -> None:
    """A LoRA transformer (conv stem, MultiheadAttention, MLPs) sharded with FSDP2's ``fully_shard``.

    Checks: the sharded model's outputs equal the unsharded reference's (adapters applied: they differ
    from the base's); the gradients that reach the adapters and the head equal the reference's on the
    whole batch (conv and linear autograd functions, the MHA weight read); after training, the file
    written by ``peftlite.save`` on every rank matches the reference's, both ranks write the same
    tensors, and the save gathers only the tensors it saves; the file loads into a sharded and into a plain
    model with equal outputs; merge refuses the sharded model before it changes anything.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        reference = lora_vit()
        model = shard(copy.deepcopy(reference), mesh)
        saved_keys = list(saved_tensors(model, wrap_state(model), ["default"]))
        # The optimizer takes the sharded parameters: built before any forward, as FSDP2 asks (after an
        # inference forward the root's parameters are its gathered temporaries until its next backward).
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        reference_trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
        assert set(trainable) == set(saved_keys) == set(reference_trainable)
        optimizer = torch.optim.SGD(trainable.values(), lr=FSDP_LR)
        reference_optimizer = torch.optim.SGD(reference_trainable.values(), lr=FSDP_LR)
        assert isinstance(model.blocks[0].fc1.weight, DTensor), "outside the forward a sharded weight reads as is"
        assert isinstance(model.blocks[0].attn.in_proj_weight, DTensor)

        paths = conv_paths(model, FSDP_BATCH // world)
        assert set(paths.values()) == {"dense", "merged", "activations"}, paths

        x = batches(1, FSDP_BATCH, 5, seed=1)[0][0]
        with torch.no_grad():
            out, expected = model(x), reference(x)
            with peftlite.disabled(reference):
                base_out = reference(x)
        forward_error = max_rel_error(out, expected)
        assert forward_error < 1e-6, f"sharded and unsharded outputs differ by {forward_error:.2e}"
        assert max_rel_error(base_out, expected) > 1e-3, "the adapters do not change the outputs"

        grad_error = 0.0
        for step, (xb, yb) in enumerate(batches(FSDP_STEPS, FSDP_BATCH, 5)):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(half(xb, rank, world)), half(yb, rank, world)).backward()
            reference_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(reference(xb), yb).backward()
            if step == 0:
                for name, p in trainable.items():
                    assert isinstance(p.grad, DTensor), f"{name}: no sharded gradient"
                    full = p.grad.full_tensor()
                    assert full.abs().max() > 0, f"{name}: zero gradient"
                    grad_error = max(grad_error, max_rel_error(full, reference_trainable[name].grad))
                frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
                assert not frozen, f"frozen parameters got gradients: {frozen[:3]}"
            optimizer.step()
            reference_optimizer.step()
        assert grad_error < 1e-5, f"sharded and unsharded gradients differ by {grad_error:.2e} (relative)"

        path = os.path.join(out_dir, f"fsdp{rank}.safetensors")
        with CommDebugMode() as comm:
            peftlite.save(model, path)  # a collective: every rank calls it
        gathers = sum(v for k, v in comm.get_comm_counts().items() if "all_gather" in str(k))
        assert all(isinstance(model.state_dict()[k], DTensor) for k in saved_keys)
        assert gathers == len(saved_keys), f"save gathered {comm.get_comm_counts()}, for {len(saved_keys)} tensors"
        if rank == 0:
            peftlite.save(reference, os.path.join(out_dir, "reference.safetensors"))
        dist.barrier()
        same, _, _ = file_errors(os.path.join(out_dir, "fsdp0.safetensors"), path, bitwise=True)
        assert same == 0.0, "the ranks wrote files with different tensors"
        file_error, config, reference_config = file_errors(path, os.path.join(out_dir, "reference.safetensors"))
        assert config == reference_config
        assert file_error < 1e-5, f"the sharded model's file differs from the reference's by {file_error:.2e}"

        fresh = peftlite.wrap(tiny_vit(), FSDP_TARGETS, rank=3, heads={"head": nn.Linear(16, 5)})
        loaded_sharded = peftlite.load(shard(fresh, mesh), path)
        loaded_plain = peftlite.load(tiny_vit(), path)
        x = batches(1, FSDP_BATCH, 5, seed=2)[0][0]
        with torch.no_grad():
            trained_out, sharded_out, plain_out = model(x), loaded_sharded(x), loaded_plain(x)
        assert torch.equal(sharded_out, trained_out), "a sharded model loads other values than it saved"
        load_error = max_rel_error(sharded_out, plain_out)
        assert load_error < 1e-6, f"sharded and plain models with one file differ by {load_error:.2e}"

        before = {k: t.to_local().clone() for k, t in loaded_sharded.state_dict().items() if isinstance(t, DTensor)}
        try:
            peftlite.merge(loaded_sharded)
        except RuntimeError as e:
            message = str(e)
        else:
            raise AssertionError("merge of a sharded model did not raise")
        assert "stem" in message and "sharded" in message and "unsharded model" in message, message
        after = loaded_sharded.state_dict()
        assert all(torch.equal(after[k].to_local(), v) for k, v in before.items()), "merge wrote before refusing"
        assert not any(m.adapter_state.merged for _, m in adapted_layers(loaded_sharded))
        with torch.no_grad():
            merged_out = peftlite.merge(loaded_plain)(x)
        merge_error = max_rel_error(merged_out, plain_out)
        assert merge_error < 1e-5, f"the plain model merged differs by {merge_error:.2e}"
        report(out_dir, rank, {"forward_error": forward_error, "grad_error": grad_error, "file_error": file_error,
                               "load_error": load_error, "gathers": gathers, "saved_tensors": len(saved_keys),
                               "saved_numel": sum(p.numel() for p in reference_trainable.values()),
                               "frozen_numel": sum(p.numel() for p in reference.parameters() if not p.requires_grad),
                               "conv_paths": paths, "merge_refusal": message})


# ---- DDP with activation checkpointing ----------------------------------------------------------------

def ddp_checkpointing_checks(rank: int, world: int, port: int, out_dir: str) -> None:
    """A LoRA tiny ResNet that trains its BatchNorms (``train_bn=True``) under DistributedDataParallel,
    checkpointed with ``peftlite.checkpointing``, beside a plain copy under its own DDP.

    Checks: the blocks are checkpointed (class swapped, state_dict keys unchanged); every step's reduced
    gradients, and after the steps every state_dict tensor (adapters, head, BatchNorm statistics, each
    updated once per step), are bitwise equal to the plain copy's.
    """
    from peftlite.demo.digits import tiny_resnet
    from peftlite.tuning.recomputation import Checkpointed

    with process_group(rank, world, port):
        torch.manual_seed(0)
        plain = peftlite.wrap(tiny_resnet(5, width=8), nn.Conv2d, rank=2, heads={"fc": nn.Linear(32, 5)},
                              train_bn=True)
        with torch.no_grad():  # B != 0, so that every adapter gets a gradient from the first step
            for name, p in plain.named_parameters():
                if ".lora." in name:
                    p.normal_(0, 0.1)
        model = peftlite.checkpointing(copy.deepcopy(plain))
        names = [n for n, m in model.named_modules() if isinstance(m, Checkpointed)]
        assert names == ["layer1.0", "layer2.0", "layer3.0"], names
        assert list(model.state_dict()) == list(plain.state_dict())
        ddp, ddp_plain = nn.parallel.DistributedDataParallel(model), nn.parallel.DistributedDataParallel(plain)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        plain_trainable = dict(plain.named_parameters())
        optimizer = torch.optim.SGD([p for _, p in trainable], lr=DDP_LR)
        plain_optimizer = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=DDP_LR)
        for x, y in batches(3, DDP_BATCH, 5):
            xb, yb = half(x, rank, world), half(y, rank, world)
            sgd_step(ddp, xb, yb, optimizer)
            sgd_step(ddp_plain, xb, yb, plain_optimizer)
            for name, p in trainable:
                assert p.grad.abs().max() > 0, f"{name}: zero gradient"
                assert torch.equal(p.grad, plain_trainable[name].grad), f"{name}: the gradients differ"
        state, plain_state = model.state_dict(), plain.state_dict()
        differ = [k for k in state if not torch.equal(state[k], plain_state[k])]
        assert not differ, f"checkpointed and plain training differ in {differ[:3]}"
        assert state["layer1.0.bn1.num_batches_tracked"] == 3
        report(out_dir, rank, {"checkpointed": names, "trainable": len(trainable)})
