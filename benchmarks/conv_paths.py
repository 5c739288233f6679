"""ResNet-50 with every conv adapted: how the conv path choice moves the inference and training ratios.

    python benchmarks/conv_paths.py [--threads 1]

Runs ``run.resnet`` (the rows of benchmarks/run.py) with the per-call cost model, then with every conv
forced onto one path (``peftlite.layers.conv``): activations, merged (both ``conv_autograd``), dense
(training only: autograd on ``functional.lora_conv2d_merged``; in inference it runs as merged). Prints
ours ÷ base for inference and ours ÷ frozen-base step for training.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402  (the shared helpers)
import run  # noqa: E402

from peftlite.layers import conv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_inf, model_train = conv.inference_path, conv.training_path
    print(f"{common.machine()}\n\n| conv path | inference ÷ base | training ÷ frozen-base step |\n|---|---|---|")
    for mode in ("cost model", "activations", "merged", "dense"):
        if mode == "cost model":
            conv.inference_path, conv.training_path = model_inf, model_train
        else:
            conv.training_path = lambda g, r, p=None, m=mode: m
            conv.inference_path = lambda g, r, p=None, m=mode: "merged" if m == "dense" else m
        inf = run.resnet(5, 160, train=False)
        tr = run.resnet(4, 128, train=True)
        print(f"| {mode} | {inf['ours'] / inf['base']:.2f} | {tr['ours'] / tr['base']:.2f} |")


if __name__ == "__main__":
    main()
