"""ResNet-50 training step with every conv adapted: the conv autograd functions against the previous paths.

    PYTHONPATH=src python benchmarks/conv_train.py [--threads 1] [--repeats 7] [--px 128] [--profile]

All contenders run in one process, interleaved, medians (``common.timed``), batch 8, r=8, BN frozen:

- ``base``: the frozen-base step (every weight frozen, gradients still flowing to the input);
- ``full``: a full fine-tune step of the same network;
- ``ours``: the wrapped model as shipped (``peftlite.layers.conv.training_path`` picks per call);
- ``autograd``: the same wrapped model with every conv on the previous paths: autograd on
  ``functional.lora_conv2d`` or ``functional.lora_conv2d_merged``, chosen by the previous cost model
  (``previous_training_path`` below). Swapped in for the timing only.

Then inference (eval, no grad, 160 px): base, ours, and ours on the previous paths (``autograd``).
``--profile`` prints the aten ops of ``base`` and ``ours`` by self CPU time (two steps each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import peftlite  # noqa: E402
from peftlite import functional as F_  # noqa: E402
from peftlite.layers import conv, conv_autograd  # noqa: E402


def previous_training_path(geom, rank, pixels=None):
    """The training cost model before ``conv_autograd`` (activations vs autograd on the merged weight)."""
    activations = 3 * rank * (geom.groups * geom.fan_in + geom.out_channels)
    dense = geom.out_channels * geom.fan_in * (pixels + 3 * rank)
    return "activations" if activations * pixels < dense else "dense"


def _functional(x, weight, bias, A, B, scale, geom, path="activations"):
    if path == "merged":  # only inference asks for it here: the merged weight, as before
        return F_.lora_conv2d_merged(x, weight, bias, A, B, scale, geom)
    return F_.lora_conv2d(x, weight, bias, A, B, scale, geom)


@contextlib.contextmanager
def previous_paths():
    saved = conv.training_path, conv_autograd.adapted_conv2d
    conv.training_path, conv_autograd.adapted_conv2d = previous_training_path, _functional
    try:
        yield
    finally:
        conv.training_path, conv_autograd.adapted_conv2d = saved


def inference(px: int) -> dict:
    """Inference of the same networks (eval, no grad): base, ours, and ours on the previous paths."""
    from torchvision.models import resnet50
    torch.manual_seed(0)
    base = resnet50().eval()
    ours = peftlite.wrap(copy.deepcopy(base), targets=nn.Conv2d, rank=8).eval()
    common.randomize_adapters(ours)
    x = torch.randn(8, 3, px, px)

    def fwd(m, previous=False):
        def go():
            with torch.no_grad(), previous_paths() if previous else contextlib.nullcontext():
                m(x)
        return go

    return {"base": fwd(base), "ours": fwd(ours), "autograd": fwd(ours, previous=True)}


def models(px: int):
    from torchvision.models import resnet50
    torch.manual_seed(0)
    base = resnet50()
    full = copy.deepcopy(base)
    ours = peftlite.wrap(copy.deepcopy(base), targets=nn.Conv2d, rank=8)
    common.randomize_adapters(ours)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 3, px, px)

    def step(m, needs_input_grad, previous=False):
        def go():
            xi = x.clone().requires_grad_(needs_input_grad)
            with previous_paths() if previous else contextlib.nullcontext():
                m(xi).square().mean().backward()
            m.zero_grad(set_to_none=True)
        return go

    for m in (base, full, ours):
        m.train()
    return {"base": step(base, True), "full": step(full, False), "ours": step(ours, False),
            "autograd": step(ours, False, previous=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--px", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--inference-px", type=int, default=160, help="0 skips the inference rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = models(args.px)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in ("base", "ours"):
            fns[name]()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fns[name]()
                fns[name]()
            print(f"== {name} (two steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))
    t = common.timed(fns, args.repeats)
    print(common.machine())
    print("| step | ms | ÷ frozen-base step | ÷ full fine-tune step |\n|---|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {1e3 * v:.1f} | {v / t['base']:.3f} | {v / t['full']:.3f} |")
    if args.inference_px:
        t = common.timed(inference(args.inference_px), args.repeats)
        print(f"\n| inference {args.inference_px}px | ms | ÷ base |\n|---|---|---|")
        for k, v in t.items():
            print(f"| {k} | {1e3 * v:.1f} | {v / t['base']:.3f} |")


if __name__ == "__main__":
    main()
