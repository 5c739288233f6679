"""Unmerged inference of a model whose parent reads only a weight's metadata (T5's ``wo.weight.dtype``).

    PYTHONPATH=src python benchmarks/t5_reads.py [--threads 1] [--repeats 15] [--bart] [--breakdown]

T5's feed-forward reads ``self.wo.weight.dtype`` before calling ``wo``: 24 reads per encoder-decoder
forward of t5-small. The read goes through the effective-weight property; it must not build
``W + scale·ΔW`` just to answer a dtype. One process, one thread, interleaved medians of base vs wrapped
(random init, every Linear adapted, r=8, adapters randomised), ``torch.no_grad()``, one encoder-decoder
forward per call (``model(input_ids, decoder_input_ids=...)``).

Shapes: batch 1 with 32 encoder / 8 decoder tokens (the goal: wrapped <= 1.15x base), and batch 4 with
64 / 16. ``--bart`` adds bart-base-sized BART (no such reads: every adapted Linear is called) for
comparison. ``--breakdown`` times four more variants, interleaved with those two: the wrapped model with
its adapted Linears computing the base product alone ("reads only": what the wrapped reads and module
calls cost), the adapter's products without the layer's bookkeeping ("products"), or the layer's own
forward with its products run through the autograd function even without grad ("autograd fn", as
before the forward skipped it there); and an unwrapped copy of the base ("base copy": the same work, so
its distance from 1 is the measurement's own noise). Then one adapted Linear's products alone, both
ways, per call.
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
from peftlite.layers import linear  # noqa: E402

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


def _reads_only(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, layer._parameters["weight"], layer.bias)


def _products(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pair = layer.lora._modules["default"]
    return linear.adapted_linear(x, layer._parameters["weight"], layer.bias, pair.A, pair.B, pair.scale)


def _autograd_fn(*args) -> torch.Tensor:
    return linear._LowRankLinear.apply(*args)


def _with_forward(model: nn.Module, forward, products, ids: torch.Tensor, dec: torch.Tensor):
    """A call of ``model`` with every adapted Linear's forward swapped for ``forward`` (None: its own), and
    the products it runs (``linear.adapted_linear``) for ``products`` (None: the same)."""
    def call():
        linear.LoraLinear.forward, linear.adapted_linear = forward or FORWARD, products or PRODUCTS
        try:
            return model(input_ids=ids, decoder_input_ids=dec)
        finally:
            linear.LoraLinear.forward, linear.adapted_linear = FORWARD, PRODUCTS
    return call


FORWARD, PRODUCTS = linear.LoraLinear.forward, linear.adapted_linear
BREAKDOWN = {"reads only": (_reads_only, None), "products": (_products, None), "autograd fn": (None, _autograd_fn)}


def per_call(repeats: int) -> dict[str, float]:
    """Median seconds of one adapted Linear's products (t5-small's 512 -> 2048, 32 tokens, r=8) without grad,
    as the layer runs them and through the autograd function; 200 calls per sample."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 32, 512), torch.randn(2048, 512), torch.randn(2048)
    A, B = torch.randn(8, 512), torch.randn(2048, 8)
    loop = lambda f: lambda: [f(x, w, b, A, B, 2.0) for _ in range(200)]  # noqa: E731
    with torch.no_grad():
        t = common.timed({"products": loop(PRODUCTS), "autograd fn": loop(_autograd_fn)}, repeats)
    return {k: v / 200 for k, v in t.items()}


def medians(base: nn.Module, repeats: int, breakdown: bool = False) -> dict[str, dict[str, float]]:
    """Median seconds of one encoder-decoder forward, base and wrapped (and the breakdown), per shape."""
    torch.manual_seed(0)
    ours = peftlite.wrap(copy.deepcopy(base), nn.Linear, rank=8)
    common.randomize_adapters(ours)
    twin = copy.deepcopy(base) if breakdown else None  # the same model again: what a null change measures
    vocab = base.config.vocab_size
    out = {}
    for batch, n_enc, n_dec in SHAPES:
        ids = torch.randint(0, vocab, (batch, n_enc))
        dec = torch.randint(0, vocab, (batch, n_dec))
        fns = {"base": lambda ids=ids, dec=dec: base(input_ids=ids, decoder_input_ids=dec),
               "ours": _with_forward(ours, None, None, ids, dec)}
        if breakdown:
            fns |= {k: _with_forward(ours, *f, ids=ids, dec=dec) for k, f in BREAKDOWN.items()}
            fns["base copy"] = lambda ids=ids, dec=dec: twin(input_ids=ids, decoder_input_ids=dec)
        with torch.no_grad():
            want = fns["ours"]().logits
            for k in ("products", "autograd fn") if breakdown else ():
                assert torch.equal(fns[k]().logits, want), k  # the same ops as the layer's own forward
            out[f"batch {batch}, {n_enc}/{n_dec} tokens"] = common.timed(fns, repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--bart", action="store_true", help="also bart-base-sized BART (no metadata reads)")
    p.add_argument("--breakdown", action="store_true", help="also the wrapped model's forward in parts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(common.machine())
    models = {"t5-small": t5_small} | ({"bart-base": bart_base} if args.bart else {})
    for name, build in models.items():
        for shape, t in medians(build(), args.repeats, args.breakdown).items():
            parts = "".join(f"  {k} {t[k] / t['base']:.3f}" for k in (*BREAKDOWN, "base copy") if k in t)
            print(f"{name:10s} {shape:24s} base {t['base'] * 1e3:7.2f} ms  wrapped {t['ours'] * 1e3:7.2f} ms  "
                  f"wrapped/base {t['ours'] / t['base']:.3f}{parts}")
    if args.breakdown:
        t = per_call(args.repeats)
        print(f"one adapted Linear 512->2048, 32 tokens, no grad: products {t['products'] * 1e6:.1f} us, "
              f"through the autograd function {t['autograd fn'] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
