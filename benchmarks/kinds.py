"""What an adapter kind costs: LoHa and LoKr against LoRA at the same rank, interleaved in one process.

    PYTHONPATH=src python benchmarks/kinds.py [--threads 1] [--repeats 7]

- a 4096² Linear, N = 1024 tokens, forward without gradients, ÷ the base Linear;
- the same Linear's exact merge + unmerge (fp32), ÷ LoRA's;
- a ResNet-50 training step (batch 8, 128 px, every Conv2d adapted, rank 8, a new head), ÷ LoRA's step.

A LoHa pair is read as its rank-r² LoRA pair (``functional.hadamard_pair``): the figures are that pair's cost
plus forming it. A LoKr layer runs two small products on the reshaped input (``functional.kron_linear``,
``kron_conv2d``) with PEFT's split (a 4096² Linear: W1 64 × 64 full, W2 64 × 64 of rank r), and merges from
ΔW's rows (``kernels.kron_rows``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import peftlite  # noqa: E402

KINDS = ("lora", "loha", "lokr")


def randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def linear(repeats: int, rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4096, 4096))
    x = torch.randn(1024, 4096)
    models = {"base": base}
    for kind in KINDS:
        models[kind] = randomize(peftlite.wrap(copy.deepcopy(base), ["0"], rank=rank, kind=kind))
    with torch.no_grad():
        return common.timed({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats)


def merge(repeats: int, rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = {kind: randomize(peftlite.wrap(nn.Sequential(nn.Linear(4096, 4096)), ["0"], rank=rank, kind=kind))
              for kind in KINDS}

    def cycle(m: nn.Module) -> None:
        peftlite.merge(m)
        peftlite.unmerge(m)

    return common.timed({k: (lambda m=m: cycle(m)) for k, m in models.items()}, repeats)


def resnet(repeats: int, rank: int) -> dict[str, float]:
    from torchvision.models import resnet50
    torch.manual_seed(0)
    base = resnet50()
    x, y = torch.randn(8, 3, 128, 128), torch.randint(0, 10, (8,))
    models, opts = {}, {}
    for kind in KINDS:
        m = copy.deepcopy(base)
        models[kind] = randomize(peftlite.wrap(m, nn.Conv2d, rank=rank, kind=kind, heads={"fc": nn.Linear(2048, 10)}))
        opts[kind] = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def step(kind: str) -> None:
        opts[kind].zero_grad(set_to_none=True)
        F.cross_entropy(models[kind](x), y).backward()
        opts[kind].step()

    return common.timed({k: (lambda k=k: step(k)) for k in models}, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"`PYTHONPATH=src python benchmarks/kinds.py {' '.join(sys.argv[1:])}`\n")
    print("| figure | LoRA | LoHa | LoKr |\n|---|---|---|---|")
    for rank in (4, 8):
        t = linear(args.repeats, rank)
        print(f"| Linear 4096², N=1024, forward ÷ base ({t['base'] * 1e3:.1f} ms), rank {rank} | "
              + " | ".join(f"{t[k] / t['base']:.2f}" for k in KINDS) + " |", flush=True)
    t = merge(args.repeats, 8)
    print(f"| Linear 4096² exact merge + unmerge, fp32, rank 8, ÷ LoRA's ({t['lora'] * 1e3:.0f} ms) | "
          + " | ".join(f"{t[k] / t['lora']:.2f}" for k in KINDS) + " |", flush=True)
    t = resnet(max(3, args.repeats // 2), 8)
    print(f"| ResNet-50 training step b8 128 px, every Conv2d rank 8, ÷ LoRA's ({t['lora'] * 1e3:.0f} ms) | "
          + " | ".join(f"{t[k] / t['lora']:.2f}" for k in KINDS) + " |")
    print(f"\nMachine: {common.machine()}")


if __name__ == "__main__":
    main()
