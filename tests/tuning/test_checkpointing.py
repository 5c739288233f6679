"""peftlite.checkpointing: gradients bit-equal to the plain step, less kept for backward, BatchNorm statistics
updated once, undo, state_dict keys, errors, and torch.compile (DDP: tests/distributed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock
from torchvision.models.vision_transformer import VisionTransformer

import peftlite
from conftest import randomize_adapters
from peftlite.demo.digits import tiny_resnet
from peftlite.tuning.recomputation import Checkpointed


def wrapped_resnet(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = peftlite.wrap(resnet18(), nn.Conv2d, rank=4, heads={"fc": nn.Linear(512, 10)}, **kwargs)
    return randomize_adapters(model)  # B != 0, so every adapter gets a gradient


def wrapped_vit() -> nn.Module:
    """A small ViT with dropout everywhere: the model's, the attention's and the adapters'."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10, dropout=0.1, attention_dropout=0.1)
    model = peftlite.wrap(model, "encoder.layers.*", rank=4, dropout=0.1, heads={"heads.head": nn.Linear(32, 10)})
    return randomize_adapters(model)


MODELS = {"resnet18": (wrapped_resnet, (2, 3, 32, 32)), "vit": (wrapped_vit, (4, 3, 32, 32))}
BLOCKS = {"resnet18": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
          "vit": ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]}


def inputs(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def step(model, x, y):
    """One train-mode forward and backward from a fixed RNG state: the loss and every trainable tensor's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def checkpointed(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Checkpointed)]


def classes(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


class SavedBytes:
    """Bytes kept for backward in one step: what autograd saves (a pack hook; each storage once, parameters and
    buffers excluded), where checkpoint's own inner hooks hide what a checkpointed block saves, plus the inputs
    the checkpointed blocks keep. With ``blocks=`` (on a plain model) the same count for those blocks as if
    they were checkpointed: what they save is left out and their inputs are counted."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None):
        self.model = model
        self.blocks = [m for m in model.modules() if isinstance(m, Checkpointed)] if blocks is None else blocks
        self.excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.kept: dict[int, torch.UntypedStorage] = {}
        self.inside = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.kept[storage.data_ptr()] = storage  # held, so no address is reused while counting

    def pack(self, t):
        if not self.inside:
            self.add(t)
        return t

    def enter(self, module, args, kwargs):
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                self.add(a)
        self.inside += 1

    def leave(self, module, args, output):
        self.inside -= 1

    def __call__(self, x, y) -> int:
        hooks = [h for m in self.blocks for h in (m.register_forward_pre_hook(self.enter, with_kwargs=True),
                                                  m.register_forward_hook(self.leave))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                step(self.model, x, y)
        finally:
            for h in hooks:
                h.remove()
        return sum(s.nbytes() for s in self.kept.values())


# ---- gradients, memory --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_gradients_equal_the_plain_step_bit_for_bit(name):
    build, shape = MODELS[name]
    model = build()
    x, y = inputs(shape)
    loss, want = step(model, x, y)
    assert peftlite.checkpointing(model) is model
    assert checkpointed(model) == BLOCKS[name]
    got_loss, got = step(model, x, y)
    assert torch.equal(got_loss, loss)
    assert got.keys() == want.keys() and any(".lora." in k for k in want)
    for k in want:
        assert want[k].abs().max() > 0, f"{k}: zero gradient, a weak comparison"
        assert torch.equal(got[k], want[k]), k
    if name == "vit":  # the masks differ from the eval-mode forward, so dropout did run
        model.eval()
        assert not torch.equal(F.cross_entropy(model(x), y), loss)


@pytest.mark.parametrize("name, most", [("resnet18", 0.8), ("vit", 0.2)])
def test_a_checkpointed_step_keeps_only_the_block_inputs(name, most):
    build, shape = MODELS[name]
    model = build()
    x, y = inputs(shape)
    plain = SavedBytes(model, blocks=[])(x, y)
    outside = SavedBytes(model, blocks=[model.get_submodule(n) for n in BLOCKS[name]])(x, y)
    peftlite.checkpointing(model)
    kept = SavedBytes(model)(x, y)
    assert kept == outside < most * plain, (kept, outside, plain)  # resnet18's stem keeps much at 32 px


def test_the_counter_sees_the_inputs_checkpoint_keeps():
    """Checkpointing one block that saves only its input keeps the same: the input, counted once."""
    block = nn.Sequential(nn.Sequential(nn.Linear(8, 8)))
    x, y = torch.randn(4, 8), torch.randint(0, 8, (4,))
    plain = SavedBytes(block)(x, y)
    peftlite.checkpointing(block, "0")
    assert SavedBytes(block)(x, y) == plain


# ---- BatchNorm statistics -----------------------------------------------------------------------------

def stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("how", ["plain-train", "train_bn", "cumulative"])
def test_batchnorm_statistics_are_updated_once_per_step(how):
    torch.manual_seed(0)
    if how == "train_bn":
        model = peftlite.wrap(tiny_resnet(5), nn.Conv2d, rank=2, heads={"fc": nn.Linear(64, 5)}, train_bn=True)
        randomize_adapters(model)
    else:
        model = tiny_resnet(5)
        if how == "cumulative":  # momentum None: the update reads num_batches_tracked
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = None
    reference = copy.deepcopy(model)
    peftlite.checkpointing(model)
    assert checkpointed(model) == ["layer1.0", "layer2.0", "layer3.0"]
    before = stats(model)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(2):
        _, want = step(reference, x + 1, y)
        _, got = step(model, x + 1, y)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    after, expected = stats(model), stats(reference)
    assert after.keys() == expected.keys()
    for k in expected:
        assert torch.equal(after[k], expected[k]), k
        assert not torch.equal(after[k], before[k]), f"{k}: not updated, a weak comparison"
    assert after["layer1.0.bn1.num_batches_tracked"] == 2

    # the independent reference: torch's checkpoint alone updates the block's statistics twice
    naive = copy.deepcopy(reference).train()
    checkpoint(naive.layer1[0], torch.randn(2, 16, 8, 8, requires_grad=True), use_reentrant=False).sum().backward()
    assert naive.layer1[0].bn1.num_batches_tracked == 4


def test_frozen_statistics_stay_frozen():
    model = wrapped_resnet()
    before = stats(model)
    peftlite.checkpointing(model)
    step(model, *inputs((2, 3, 32, 32)))
    after = stats(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---- undo, idempotence, state_dict, selection ------------------------------------------------------------

def test_undo_gives_back_the_classes_and_the_plain_behaviour():
    model = wrapped_resnet()
    x, y = inputs((2, 3, 32, 32))
    original, keys = classes(model), list(model.state_dict())
    plain = SavedBytes(model)(x, y)
    _, want = step(model, x, y)

    peftlite.checkpointing(model)
    assert list(model.state_dict()) == keys
    swapped = classes(model)
    assert {type(model.layer1[0]).__name__} == {"CheckpointedBasicBlock"}
    assert isinstance(model.layer1[0], BasicBlock) and type(model.layer1[0]) is type(model.layer4[1])
    assert peftlite.checkpointing(model, True) is model and classes(model) == swapped  # again: a no-op

    assert peftlite.checkpointing(model, False) is model
    assert classes(model) == original and list(model.state_dict()) == keys
    assert SavedBytes(model)(x, y) == plain
    _, got = step(model, x, y)
    assert all(torch.equal(got[k], want[k]) for k in want)
    peftlite.checkpointing(model, False)  # not checkpointed: a no-op
    assert classes(model) == original


def test_wrap_after_checkpointing_adapts_the_layers_inside_the_blocks():
    torch.manual_seed(0)
    model = peftlite.checkpointing(tiny_resnet(5))
    keys = list(model.state_dict())
    peftlite.wrap(model, nn.Conv2d, rank=2, heads={"fc": nn.Linear(64, 5)})
    assert checkpointed(model) == ["layer1.0", "layer2.0", "layer3.0"]
    assert type(model.layer2[0].conv1).__name__ == "LoraConv2d"
    assert type(model.layer2[0].bn1).__name__ == "FrozenBatchNorm2d"
    assert set(keys) <= set(model.state_dict())
    peftlite.unwrap(peftlite.checkpointing(model, False), merge=False)
    assert list(model.state_dict()) == keys and not checkpointed(model)


def test_patterns_select_the_outermost_modules():
    model = wrapped_resnet()
    assert checkpointed(peftlite.checkpointing(model, "layer4")) == ["layer4"]
    peftlite.checkpointing(model, ["layer4.*", "layer3.1"])  # inside layer4: left as it is
    assert checkpointed(model) == ["layer3.1", "layer4"]
    peftlite.checkpointing(peftlite.checkpointing(model, False), "layer*")
    assert checkpointed(model) == ["layer1", "layer2", "layer3", "layer4"]
    peftlite.checkpointing(peftlite.checkpointing(model, False), BasicBlock)
    assert len(checkpointed(model)) == 8


def test_timm_blocks_are_checkpointed():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              num_classes=10)  # timm groups the final norm with the last block: blocks.1+norm
    model = randomize_adapters(peftlite.wrap(model, "blocks.*", rank=2, heads={"head": nn.Linear(32, 10)}))
    x, y = inputs((2, 3, 32, 32))
    _, want = step(model, x, y)
    assert checkpointed(peftlite.checkpointing(model)) == ["blocks.0", "blocks.1"]
    _, got = step(model, x, y)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- errors -------------------------------------------------------------------------------------------

def test_a_model_without_a_checkpointable_block_names_its_class_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"Sequential has no block.*pass blocks="):
        peftlite.checkpointing(model)
    assert not checkpointed(model)


def test_bad_blocks_raise_and_change_nothing():
    model = wrapped_resnet()
    original = classes(model)
    with pytest.raises(ValueError, match=r"'layer9' names no module.*would match"):
        peftlite.checkpointing(model, "layer9")
    with pytest.raises(ValueError, match=r"GRU selected no module"):
        peftlite.checkpointing(model, nn.GRU)
    with pytest.raises(TypeError, match=r"3 \(int\) is not a pattern"):
        peftlite.checkpointing(model, 3)
    with pytest.raises(TypeError, match=r"module object \(BasicBlock\).*'layer1.0'"):
        peftlite.checkpointing(model, [model.layer1[0]])
    with pytest.raises(TypeError, match=r"'layer1.0.conv1' is an adapted layer \(LoraConv2d\).*'layer1.0'"):
        peftlite.checkpointing(model, ["layer2", "layer1.0.conv1"])
    with pytest.raises(TypeError, match=r"'layer1.0.bn1' is a norm"):
        peftlite.checkpointing(model, "layer1.0.bn1")
    assert classes(model) == original
    with pytest.raises(TypeError, match=r"'fc' is a layer peftlite adapts \(Linear"):
        peftlite.checkpointing(resnet18(), "fc")


# ---- torch.compile ------------------------------------------------------------------------------------

def test_compiled_checkpointed_training_matches_eager():
    """One graph (fullgraph) with a checkpoint region per block; eager gradients and statistics, updated once."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._higher_order_ops.wrap import tag_activation_checkpoint

    torch.manual_seed(0)
    model = peftlite.wrap(tiny_resnet(5), nn.Conv2d, rank=2, heads={"fc": nn.Linear(64, 5)}, train_bn=True)
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(peftlite.checkpointing(model), fullgraph=True, backend=backend)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(2):
        _, want = step(reference, x, y)
        step(compiled, x, y)
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(graphs) == 1
    regions = [n for n in graphs[0].graph.nodes if n.target is tag_activation_checkpoint]
    assert len(regions) == 3  # layer1.0, layer2.0, layer3.0
    want_stats, got_stats = stats(reference), stats(model)
    for k in want_stats:
        torch.testing.assert_close(got_stats[k], want_stats[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got_stats["layer1.0.bn1.num_batches_tracked"] == 2
