"""The peftlite demo: pretrain on digits 0-4, adapt to 5-9 four ways, ship the adapter, merge it.

    python -m peftlite.demo            # or: peftlite demo   (about 10 s on 2 CPU cores)
    python -m peftlite.demo --quick    # a few seconds: what the test suite runs

Real data with no download (scikit-learn's 1,797 bundled 8x8 digits), no GPU. Writes into ``--out``
(default ``demo_out/``): base.safetensors, one adapter file per method, curves.png and report.md; with
``--tensorboard DIR``, also one TensorBoard run per method under DIR (``tensorboard --logdir DIR``).
Needs the ``demo`` extra: ``pip install 'peftlite[demo]'`` (and ``'peftlite[tensorboard]'`` for that).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..formats.native import load, save
from ..merging import merge, unmerge
from ..state import wrap_state
from ..tuning.report import summary
from ..wrapping import wrap
from . import digits
from .options import DESCRIPTION, add_arguments


@dataclass
class Result:
    method: str
    accuracy: float
    trainable: int
    seconds: float
    file: str
    file_bytes: int
    history: list[dict] = field(default_factory=list)


def fresh_base(base_path: str) -> nn.Module:
    """A new tiny ResNet with the pretrained (digits 0-4) weights."""
    model = digits.tiny_resnet(len(digits.BASE_CLASSES))
    model.load_state_dict(load_file(base_path))
    return model


def new_head(model: nn.Module) -> nn.Linear:
    return nn.Linear(model.fc.in_features, len(digits.NEW_CLASSES))


# method name -> (how to prepare the pretrained model, learning rate)
METHODS = {
    "head only": (lambda m: wrap(m, None, heads={"fc": new_head(m)}), 1e-2),
    "LoRA on every Conv2d + head": (lambda m: wrap(m, nn.Conv2d, rank=4, alpha=8,
                                                            heads={"fc": new_head(m)}), 5e-3),
    "last stage + head": (lambda m: wrap(m, None, heads={"fc": new_head(m)}, trainable=["layer3"]),
                          3e-3),
    "full fine-tune": (lambda m: setattr(m, "fc", new_head(m)) or m, 3e-3),
}


def adapt(method: str, base_path: str, split: digits.Split, epochs: int, seed: int, out: str,
          progress: bool, tensorboard: str | None = None) -> tuple[Result, nn.Module]:
    prepare, lr = METHODS[method]
    torch.manual_seed(seed)
    model = prepare(fresh_base(base_path))
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    history = digits.train(model, split, torch.optim.AdamW(params, lr=lr), epochs, seed=seed, desc=method,
                            progress=progress, tensorboard=tensorboard)
    seconds = time.perf_counter() - start
    slug = method.split(" ")[0].lower()
    if wrap_state(model) is not None:
        path = save(model, os.path.join(out, f"adapter_{slug}.safetensors"))
    else:  # a full fine-tune ships every weight
        path = os.path.join(out, "full_finetune.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    acc = digits.accuracy(model, split.x_test, split.y_test)
    return Result(method, acc, sum(p.numel() for p in params), seconds, os.path.basename(path),
                  os.path.getsize(path), history), model


def check_round_trip(trained: nn.Module, adapter: str, base_path: str, x: torch.Tensor) -> dict[str, object]:
    """Reload the adapter into a fresh base (identical outputs), merge (equal up to rounding), unmerge."""
    trained.eval()
    reloaded = load(fresh_base(base_path), adapter).eval()
    with torch.no_grad():
        want = trained(x)
        got = reloaded(x)
        weights = {k: v.clone() for k, v in reloaded.state_dict().items()}
        merge(reloaded)
        merged = reloaded(x)
        unmerge(reloaded)
    restored = all(torch.equal(v, reloaded.state_dict()[k]) for k, v in weights.items())
    return {
        "reloaded outputs identical": bool(torch.equal(got, want)),
        "merged max |difference|": float((merged - want).abs().max()),
        "merged predictions identical": bool(torch.equal(merged.argmax(1), want.argmax(1))),
        "unmerge restores every weight bit-exactly": restored,
    }


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        ax_loss.plot(epochs, [h["loss"] for h in r.history], marker="o", label=r.method)
        ax_acc.plot(epochs, [h["accuracy"] for h in r.history], marker="o", label=r.method)
    ax_loss.set(title="training loss (digits 5-9)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="test accuracy (digits 5-9)", xlabel="epoch", ylabel="accuracy")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[Result], markdown: bool = False) -> str:
    head = ("method", "accuracy", "trainable params", "seconds", "file", "file size")
    rows = [(r.method, f"{100 * r.accuracy:.1f}%", f"{r.trainable:,}", f"{r.seconds:.1f}", r.file,
             f"{r.file_bytes / 1024:.1f} KiB") for r in results]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 or i == 4 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows])


def report(path: str, results: list[Result], checks: dict, base_acc: float, args, seconds: float) -> None:
    lines = [
        "# peftlite demo report", "",
        f"A tiny ResNet was pretrained on digits 0-4 (test accuracy {100 * base_acc:.1f}%), then adapted to "
        f"digits 5-9 four ways ({args.epochs} epochs each, seed {args.seed}"
        f"{', quick mode' if args.quick else ''}). Data: scikit-learn's bundled 8x8 digits, upsampled to 16x16.",
        "", table(results, markdown=True), "",
        "## The LoRA adapter, shipped and merged", "",
        "The LoRA adapter file was loaded into a fresh copy of the pretrained base, then merged:", "",
    ]
    lines += [f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in checks.items()]
    lines += ["", "![loss and accuracy per epoch](curves.png)", "", f"Total time: {seconds:.0f} s."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftlite.demo", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed options; 0 when the adapter round trip and the unmerge are exact."""
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 8)
    progress = not args.no_progress
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    print(f"1. pretraining a tiny ResNet on digits 0-4 ({'2' if args.quick else '8'} epochs)")
    backbone = digits.pretrained_backbone(args.seed, epochs=2 if args.quick else 8, progress=progress)
    old = digits.digit_split(digits.BASE_CLASSES, args.seed)
    base_acc = digits.accuracy(backbone, old.x_test, old.y_test)
    base_path = os.path.join(args.out, "base.safetensors")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, base_path)
    print(f"   test accuracy on 0-4: {100 * base_acc:.1f}%; base weights: {base_path} "
          f"({os.path.getsize(base_path) / 1024:.0f} KiB)")

    print(f"2. adapting to digits 5-9 four ways ({args.epochs} epochs each)")
    new = digits.digit_split(digits.NEW_CLASSES, args.seed)
    results, models = [], {}
    for method in METHODS:
        result, models[method] = adapt(method, base_path, new, args.epochs, args.seed, args.out, progress,
                                       args.tensorboard)
        results.append(result)
        print(f"   {method}: {100 * result.accuracy:.1f}% in {result.seconds:.1f} s")
    print()
    print(table(results))
    print()

    lora = "LoRA on every Conv2d + head"
    adapter = os.path.join(args.out, results[list(METHODS).index(lora)].file)
    print(f"3. reloading {adapter} into a fresh pretrained base, then merging")
    checks = check_round_trip(copy.deepcopy(models[lora]), adapter, base_path, new.x_test)
    for k, v in checks.items():
        print(f"   {k}: {v:.3g}" if isinstance(v, float) else f"   {k}: {v}")
    print(f"   LoRA model: {str(summary(models[lora])).splitlines()[-1]}")

    plot(results, os.path.join(args.out, "curves.png"))
    seconds = time.perf_counter() - start
    report(os.path.join(args.out, "report.md"), results, checks, base_acc, args, seconds)
    print(f"4. wrote {os.path.join(args.out, 'curves.png')} and {os.path.join(args.out, 'report.md')} "
          f"({seconds:.0f} s in all)")
    if args.tensorboard is not None:
        print(f"   TensorBoard runs, one per method: tensorboard --logdir {args.tensorboard}")
    ok = checks["reloaded outputs identical"] and checks["unmerge restores every weight bit-exactly"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
