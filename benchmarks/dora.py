"""DoRA's cost: the unmerged Linear forward against the base and PEFT's DoRA, and a training step's memory.

    PYTHONPATH=src python benchmarks/dora.py [--threads 1]

Used by benchmarks/run.py. One process, interleaved, medians; N=1024, d=4096, r=16 on CPU.

- ``inference``: ``torch.no_grad()``, the norms reused between calls (nothing changes): peftlite's case
  for serving; ``fresh norms``: the same forward with A touched in place before every call (as an
  optimizer step does), so the norms are recomputed every time (``W Aᵀ``, out·in·r).
- training-step memory: the bytes autograd saves for the backward of one forward (beyond the weights
  and the input), plain LoRA against DoRA (and PEFT's DoRA), batch N=1024.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import peftlite  # noqa: E402

N, D, R = 1024, 4096, 16


def _dora_model(base: nn.Module) -> nn.Module:
    ours = peftlite.wrap(copy.deepcopy(base), "0", rank=R, variant="dora")
    with torch.no_grad():
        ours[0].lora.default.B.normal_(0, 1e-3)
    return ours


def forward(repeats: int) -> dict:
    """Medians of base, ours (norms reused), ours with fresh norms, and PEFT's DoRA, all no-grad."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, D))
    ours = _dora_model(base)
    x = torch.randn(N, D)
    A = ours[0].lora.default.A

    def fresh():
        A.add_(0.0)  # a new version of A: the norms are recomputed, as after an optimizer step
        ours(x)

    fns = {"base": lambda: base(x), "ours": lambda: ours(x), "fresh": fresh}
    if common.peft:
        theirs = common.peft.get_peft_model(copy.deepcopy(base), common.peft.LoraConfig(
            r=R, lora_alpha=R, target_modules=["0"], use_dora=True))
        theirs.eval()
        fns["peft"] = lambda: theirs(x)
    with torch.no_grad():
        return common.timed(fns, repeats)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward (distinct storages other than the input and
    the parameters): a training step's memory beyond what is there anyway, exactly and repeatably (RSS
    high-water marks move with the allocator). The loss's own square is included, alike for every model."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).square().mean()
    held = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in held)


def step_memory() -> dict:
    """Bytes saved for backward by one training step: plain LoRA, DoRA, and PEFT's DoRA (x excluded)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, D))
    x = torch.randn(N, D)
    models = {"lora": peftlite.wrap(copy.deepcopy(base), "0", rank=R), "dora": _dora_model(base)}
    if common.peft:
        models["peft-dora"] = common.peft.get_peft_model(copy.deepcopy(base), common.peft.LoraConfig(
            r=R, lora_alpha=R, target_modules=["0"], use_dora=True))
    return {k: saved_bytes(m, x) for k, m in models.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = forward(args.repeats)
    print(common.machine())
    print({k: f"{v / t['base']:.3f}" for k, v in t.items()})
    print({k: f"{v / 2**20:.1f} MiB" if isinstance(v, int) else v for k, v in step_memory().items()})


if __name__ == "__main__":
    main()
