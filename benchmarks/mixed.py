"""Mixed-adapter batches: every row its own adapter, peftlite's per_sample against PEFT's adapter_names.

    PYTHONPATH=src python benchmarks/mixed.py [--threads 1] [--repeats 15] [--breakdown]

Used by benchmarks/run.py for the table in docs/performance.md. Inference (PEFT's path runs in eval mode
only), one process, contenders interleaved, medians. The figure is the time a mixed batch adds over the
plain base model: ``ours - base`` against ``peft - base`` (goal: ours ≤ 1/3 of PEFT's at 16 and 64
adapters on the Linear case).

- Linear: two ``nn.Linear(1024, 1024)`` layers, r=16, batch 64, K = 4, 16, 64 adapters;
- ResNet-50, every Conv2d adapted, r=8, batch 16 at 96 px, K = 4, 16, 64.

Rows are spread over the K adapters at random with a fixed seed. ``--breakdown`` times the Linear case
only, with two more variants of ours interleaved: the routing kernel's call replaced by a no-op ("no
kernel": the route's setup and the layers' Python), and by its argument checks and factor table alone;
then the time ``per_sample`` takes to enter and leave, for the two Linears and for ResNet-50 (16 adapters).
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
from peftlite.kernels import route as kernel  # noqa: E402
from peftlite.layers import routing  # noqa: E402

try:
    import peft
except ImportError:  # pragma: no cover - the bench extra is optional
    peft = None


def _random_b(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name and name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _same_factors(ours: nn.Module, theirs: nn.Module) -> None:
    """Give PEFT's adapters the values of ours, so that both compute the same thing."""
    with torch.no_grad():
        for lname, layer in peftlite.layers.adapted_layers(ours):
            target = theirs.base_model.model.get_submodule(lname)
            for n, pairs in layer.adapters().items():
                pair = pairs["weight"]
                target.lora_A[n].weight.copy_(pair.A.reshape(target.lora_A[n].weight.shape))
                target.lora_B[n].weight.copy_(pair.B.reshape(target.lora_B[n].weight.shape))


def contenders(base: nn.Module, targets: list[str], rank: int, K: int, route: list[int]):
    """``{"base", "ours", "peft"}`` -> a no-grad forward callable, and the shared input's batch size."""
    names = [f"a{k}" for k in range(K)]
    ours = copy.deepcopy(base)
    for n in names:
        peftlite.wrap(ours, targets, rank=rank, alpha=float(rank), name=n)
    _random_b(ours, 1)
    rows = [names[k] for k in route]
    fns = {"base": lambda x: base(x)}

    def ours_fn(x):
        with peftlite.per_sample(ours, rows):
            return ours(x)

    fns["ours"] = ours_fn
    if peft is not None:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=rank,
                                                                          target_modules=targets),
                                     adapter_name=names[0])
        for n in names[1:]:
            theirs.add_adapter(n, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        _same_factors(ours, theirs)
        theirs.eval()
        fns["peft"] = lambda x: theirs(x, adapter_names=rows)
    return fns


def _checks_only(y, x, slots, A, B, scales) -> bool:
    kernel._check_batch(y, x, slots, A, B, scales)
    kernel._factors(A, B, x.shape[-1], y.shape[-1])
    return True


def _with_kernel(fn, stand_in):
    """``fn`` with the routed Linear's kernel call replaced by ``stand_in`` (the output is then wrong)."""
    def call(x):
        routing.route_linear_ = stand_in
        try:
            return fn(x)
        finally:
            routing.route_linear_ = kernel.route_linear_
    return call


def measure(base: nn.Module, targets: list[str], rank: int, K: int, x: torch.Tensor, repeats: int,
            breakdown: bool = False) -> dict:
    """Medians of the contenders; ``breakdown`` adds ours without its kernel call and with its checks alone."""
    base.eval()
    route = torch.randint(0, K, (x.shape[0],), generator=torch.Generator().manual_seed(0)).tolist()
    fns = contenders(base, targets, rank, K, route)
    if breakdown:
        fns |= {"no kernel": _with_kernel(fns["ours"], lambda *args: True),
                "checks only": _with_kernel(fns["ours"], _checks_only)}
    with torch.no_grad():
        want = fns["ours"](x)
        if "peft" in fns:
            torch.testing.assert_close(fns["peft"](x), want, rtol=1e-3, atol=1e-3)  # same adapters, same route
        return common.timed({k: (lambda f=f: f(x)) for k, f in fns.items()}, repeats, warmup=2)


def route_setup(model: nn.Module, K: int, repeats: int) -> float:
    """Median seconds of entering and leaving ``per_sample`` on ``model`` with K adapters on every target."""
    for k in range(K):
        peftlite.wrap(model, nn.Linear if isinstance(model, nn.Sequential) else nn.Conv2d, rank=8, name=f"a{k}")
    rows = [f"a{k % K}" for k in range(64)]

    def enter():
        with peftlite.per_sample(model, rows):
            pass
    return common.timed({"setup": enter}, repeats, warmup=5)["setup"]


def linear_case(K: int, repeats: int, breakdown: bool = False) -> dict:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    return measure(base, ["0", "1"], 16, K, torch.randn(64, 1024), repeats, breakdown)


def resnet_case(K: int, repeats: int) -> dict:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    base = resnet50()
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    return measure(base, convs, 8, K, torch.randn(16, 3, 96, 96), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--breakdown", action="store_true", help="the Linear case only, ours in parts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.breakdown:
        print(f"{common.machine()}\n\n2 × Linear 1024, r=16, batch 64; ms added over the base")
        for K in (16, 64):
            t = linear_case(K, args.repeats, breakdown=True)
            print(f"K={K}: " + "  ".join(f"{k} {1e3 * (v - t['base']):.2f}" for k, v in t.items() if k != "base"))
        from torchvision.models import resnet50

        for name, model in (("2 × Linear", nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))),
                            ("ResNet-50 (53 convs)", resnet50())):
            print(f"per_sample enter + exit, {name}, 16 adapters: {1e3 * route_setup(model, 16, 200):.3f} ms")
        return
    print(f"{common.machine()}\n\n| case | K | base | peftlite adds | PEFT adds | ours ÷ PEFT (added) | "
          "throughput ÷ PEFT |")
    print("|---|---|---|---|---|---|---|")
    cases = (("2 × Linear 1024, r=16, batch 64", linear_case), ("ResNet-50, r=8, batch 16, 96 px", resnet_case))
    for case, fn in cases:
        for K in (4, 16, 64):
            t = fn(K, args.repeats if fn is linear_case else max(3, args.repeats // 3))
            ours, theirs = t["ours"] - t["base"], t.get("peft", float("nan")) - t["base"]
            print(f"| {case} | {K} | {1e3 * t['base']:.2f} ms | {1e3 * ours:.2f} ms | {1e3 * theirs:.2f} ms | "
                  f"{ours / theirs:.2f} | {t.get('peft', float('nan')) / t['ours']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
