"""Unmerged inference of a model whose parent reads only a weight's metadata (T5's ``wo.weight.dtype``).

    PYTHONPATH=src python benchmarks/t5_reads.py [--threads 1] [--repeats 15] [--bart]

T5's feed-forward reads ``self.wo.weight.dtype`` before calling ``wo``: 24 reads per encoder-decoder
forward of t5-small. The read goes through the effective-weight property; it must not build
``W + scale·ΔW`` just to answer a dtype. One process, one thread, interleaved medians of base vs wrapped
(random init, every Linear adapted, r=8, adapters randomised), ``torch.no_grad()``, one encoder-decoder
forward per call (``model(input_ids, decoder_input_ids=...)``).

Shapes: batch 1 with 32 encoder / 8 decoder tokens (the goal: wrapped <= 1.15x base), and batch 4 with
64 / 16. ``--bart`` adds bart-base-sized BART (no such reads: every adapted Linear is called) for
comparison.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import run  # noqa: E402

import peftlite  # noqa: E402

SHAPES = ((1, 32, 8), (4, 64, 16))  # (batch, encoder tokens, decoder tokens)


def t5_small() -> nn.Module:
    import transformers

    config = transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                                   num_heads=8, vocab_size=32128)
    return transformers.T5ForConditionalGeneration(config).eval()


def bart_base() -> nn.Module:
    import transformers

    config = transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                     vocab_size=50265)
    return transformers.BartForConditionalGeneration(config).eval()


def medians(base: nn.Module, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of one encoder-decoder forward, base and wrapped, per shape."""
    torch.manual_seed(0)
    ours = peftlite.wrap(copy.deepcopy(base), nn.Linear, rank=8)
    run.randomize_adapters(ours)
    vocab = base.config.vocab_size
    out = {}
    for batch, n_enc, n_dec in SHAPES:
        ids = torch.randint(0, vocab, (batch, n_enc))
        dec = torch.randint(0, vocab, (batch, n_dec))
        fns = {k: lambda m=m, ids=ids, dec=dec: m(input_ids=ids, decoder_input_ids=dec)
               for k, m in (("base", base), ("ours", ours))}
        with torch.no_grad():
            out[f"batch {batch}, {n_enc}/{n_dec} tokens"] = run.timed(fns, repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--bart", action="store_true", help="also bart-base-sized BART (no metadata reads)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(run.machine())
    models = {"t5-small": t5_small} | ({"bart-base": bart_base} if args.bart else {})
    for name, build in models.items():
        for shape, t in medians(build(), args.repeats).items():
            print(f"{name:10s} {shape:24s} base {t['base'] * 1e3:7.2f} ms  wrapped {t['ours'] * 1e3:7.2f} ms  "
                  f"wrapped/base {t['ours'] / t['base']:.3f}")


if __name__ == "__main__":
    main()
