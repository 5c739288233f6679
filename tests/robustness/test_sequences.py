"""Property tests: random Conv2d/Linear geometries × rank × dtype × random sequences of wrap, merge,
unmerge, disabled, save, load and unwrap, with the model's invariants checked after every step:

- the output equals the functional oracle on W + scale·ΔW (unmerged or merged), or the base (disabled,
  unwrapped without merging);
- whenever unmerged, the base weight is bit-identical to the original;
- a saved file loads into a fresh copy of the base with identical outputs.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftlite
from peftlite import functional

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}


@st.composite
def layers(draw):
    if draw(st.booleans()):
        return nn.Linear(draw(st.integers(1, 9)), draw(st.integers(1, 9)), bias=draw(st.booleans()))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if padding != "valid" else "zeros"
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, draw(st.booleans()), mode)


def oracle(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, adapted: bool) -> torch.Tensor:
    """What the layer must compute: the base op on W (+ scale·ΔW when ``adapted``), in float64."""
    w = weight.double()
    if adapted:
        pair = layer.lora.default
        w = w + pair.scale * functional.delta_weight(pair.A.double(), pair.B.double(), w.shape)
    b = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x.double(), w, b)
    return functional.conv2d(x.double(), w, b, functional.ConvGeometry.of(layer))


STEPS = st.lists(st.sampled_from(["merge", "unmerge", "disabled", "save_load", "unwrap_merged", "unwrap_plain",
                                  "rewrap"]), min_size=1, max_size=6)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layer=layers(), rank=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       steps=STEPS, seed=st.integers(0, 2**16))
def test_random_sequences_keep_the_invariants(tmp_path_factory, layer, rank, dtype, steps, seed):
    torch.manual_seed(seed)
    layer = layer.to(dtype)
    base = copy.deepcopy(layer)
    original = layer.weight.detach().clone()
    x = (torch.randn(2, layer.in_features) if isinstance(layer, nn.Linear)
         else torch.randn(2, layer.in_channels, 6, 7)).to(dtype)
    model = nn.Sequential(layer)

    def wrap():
        peftlite.wrap(model, "0", rank=rank, alpha=2.0 * rank)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model[0].lora.default.B.copy_(torch.randn(model[0].lora.default.B.shape, generator=g) * 0.1)

    def check(expect_adapted: bool):
        tol = TOL[dtype] * (1 + float(original.double().abs().max()))
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), oracle(model[0], original, x, expect_adapted),
                                       rtol=tol, atol=tol)
        if not getattr(model[0], "adapter_state", None) or not model[0].adapter_state.merged:
            assert torch.equal(model[0]._parameters["weight"].view(torch.uint8), original.view(torch.uint8))

    wrap()
    wrapped, folder = True, tmp_path_factory.mktemp("seq")
    check(True)
    for i, step in enumerate(steps):
        if step == "rewrap" and not wrapped:
            wrap()
            wrapped = True
        elif not wrapped:
            continue
        elif step == "merge" and not model[0].adapter_state.merged:
            peftlite.merge(model)
        elif step == "unmerge" and model[0].adapter_state.merged:
            peftlite.unmerge(model)
        elif step == "disabled":
            with peftlite.disabled(model), torch.no_grad():
                torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # the base, to the bit
        elif step == "save_load":
            path = peftlite.save(model, folder / f"{i}.safetensors")
            fresh = peftlite.load(nn.Sequential(copy.deepcopy(base)), path)
            with torch.no_grad():
                want = model(x) if not model[0].adapter_state.merged else None
                if want is not None:  # unmerged: the reload computes the same thing to the bit
                    assert torch.equal(fresh(x), want)
            torch.testing.assert_close(fresh[0].lora.default.B, model[0].lora.default.B, rtol=0, atol=0)
        elif step in ("unwrap_merged", "unwrap_plain"):
            keep = step == "unwrap_merged"
            with torch.no_grad():
                want = oracle(model[0], original, x, True)  # before the adapters go
            peftlite.unwrap(model, merge=keep)
            wrapped = False
            assert type(model[0]) is type(base)
            if not keep:
                check(False)
                continue
            tol = TOL[dtype] * (1 + float(original.double().abs().max()))
            with torch.no_grad():  # plain modules now, computing W + scale·ΔW rounded once
                torch.testing.assert_close(model(x).double(), want, rtol=tol, atol=tol)
            original = model[0].weight.detach().clone()  # the merged weight is the new base
            base = copy.deepcopy(model[0])
            continue
        check(True)
