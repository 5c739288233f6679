"""LoHa's and LoKr's Tucker form (``wrap(..., tucker=True)``, PEFT's ``use_effective_conv2d``): on kh×kw convs each
low-rank input factor is a core contracted with an (r, in/groups) factor. Checked against PEFT's definition in
fp64 on conv geometries, for exact merges, and as files: native, PEFT both ways with the real package, LyCORIS."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peftlite
from peftlite import functional
from peftlite.formats.peft import PeftFormatError
from peftlite.functional import ConvGeometry
from peftlite.layers import adapted_layers

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import assert_matches_reference, randomize_adapters  # noqa: E402

GEOMETRIES = [  # (cin, cout, k, stride, padding, dilation, groups, padding_mode)
    (6, 8, 3, 1, 1, 1, 1, "zeros"), (6, 8, (3, 2), 2, 1, 2, 2, "reflect"), (8, 8, 3, 1, 2, 2, 8, "circular"),
]


# nonzero factors everywhere (some start at zero), so ΔW is not zero
randomize = functools.partial(randomize_adapters, std=0.3, seed=1)


def peft_tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, kernel) -> torch.Tensor:
    """PEFT's make_weight_cp: W[p, r, h, w] = Σ_ij core[i, j, h, w] w_b[j, r] w_a[i, p]  (out, in, kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", core.reshape(*core.shape[:2], *kernel), w_b, w_a)


def dense_delta(pair, kernel) -> torch.Tensor:
    """scale·ΔW of a Tucker pair by PEFT's formulas, fp64, as the (out, in/g, kh, kw) weight."""
    if pair.kind == "loha":
        w = [peft_tucker(getattr(pair, f"T{i}"), getattr(pair, f"B{i}").t(), getattr(pair, f"D{i}"), kernel)
             for i in (1, 2)]
        return pair.scale * w[0] * w[1]
    W1 = pair.W1 if pair.W1 is not None else pair.B1 @ pair.A1
    W2 = peft_tucker(pair.T2, pair.B2.t(), pair.D2, kernel)  # (out_k, in_n, kh, kw)
    return pair.scale * torch.kron(W1[:, :, None, None], W2.contiguous())  # PEFT's make_kron


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_tucker_convs_match_peft_s_definition_values_and_gradients(kind, geometry):
    cin, cout, k, stride, padding, dilation, groups, mode = geometry
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, True, mode).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), ["0"], rank=1, kind=kind, tucker=True).double())
    pair = m[0].lora["default"]
    assert pair.tucker and "T2" in dict(pair.named_parameters())
    params = list(pair.parameters())
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    m.train()
    y = m(x)
    ref = functional.conv2d(x, base.weight + dense_delta(pair, base.kernel_size), base.bias, ConvGeometry.of(base))
    assert_matches_reference(y, ref, [x, *params], (1e-10, 1e-10), (1e-9, 1e-9))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_fresh_tucker_layer_is_the_base_and_1x1_convs_and_linears_stay_flat(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 6))
    x = torch.randn(2, 4, 4, 4)
    want = model(x)
    m = peftlite.wrap(model, [nn.Conv2d, nn.Linear], rank=1, kind=kind, tucker=True)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    assert [layer.lora["default"].tucker for _, layer in adapted_layers(m)] == [True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_merge_is_the_forward_and_unmerge_is_bit_exact(kind, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2))
    m = randomize(peftlite.wrap(model, nn.Conv2d, rank=2, kind=kind, tucker=True), seed=3).to(dtype).eval()
    x = torch.randn(2, 4, 6, 6).to(dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        want = m(x)
        for _ in range(20):
            peftlite.merge(m)
            merged = m(x)
            peftlite.unmerge(m)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged.float(), want.float(), rtol=tol, atol=tol)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_files_round_trip_native_and_lycoris(kind, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
    m = randomize(peftlite.wrap(copy.deepcopy(base), nn.Conv2d, rank=1, kind=kind, tucker=True))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = m(x)
    for fmt in ("peftlite", "lycoris"):
        path = peftlite.save(m, tmp_path / f"{fmt}.safetensors", format=fmt)
        fresh = peftlite.load(copy.deepcopy(base), path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-6)
        tucker = fresh[0].lora["default"].tucker
        assert tucker == (fmt == "peftlite")  # a LyCORIS Tucker entry is read as the flat form of the same ΔW


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_tucker_adapters_go_both_ways_with_peft_s_outputs(kind, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    # PEFT 0.22's own LoKr Tucker forward fails on a non-square kernel (torch.kron of a non-contiguous view)
    k2 = (3, 1) if kind == "loha" else (3, 3)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, k2, padding=(1, k2[1] // 2))).eval()
    config = (peft.LoHaConfig if kind == "loha" else peft.LoKrConfig)(
        r=2 if kind == "loha" else 1, alpha=3, target_modules=["0", "2"], use_effective_conv2d=True,
        init_weights=False)  # LoKr: rank 1, so that W2 is low-rank (PEFT's Tucker W2 needs it)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    x = torch.randn(2, 4, 5, 5)
    ours = peftlite.load(copy.deepcopy(base), tmp_path / "theirs")
    assert all(layer.lora["default"].tucker for _, layer in adapted_layers(ours))  # read as the Tucker form
    with torch.no_grad():
        want = theirs(x)
        assert (want - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    peftlite.save(ours, tmp_path / "back", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert again.peft_config["default"].use_effective_conv2d
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)


def test_what_the_tucker_form_refuses(tmp_path):
    with pytest.raises(ValueError, match="tucker=True: the Tucker form .* needs kind='loha' or 'lokr'"):
        peftlite.wrap(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"], tucker=True)
    m = peftlite.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), ["0"], rank=1, kind="loha", tucker=True)
    peftlite.wrap(m, ["1"], rank=1, kind="loha")  # the same adapter on another conv, without the Tucker form
    with pytest.raises(PeftFormatError, match="0 is in the Tucker form and 1 is not"):
        peftlite.save(m, tmp_path / "d", format="peft")
    assert not (tmp_path / "d").exists()
