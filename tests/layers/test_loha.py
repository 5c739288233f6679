"""LoHa (``wrap(..., kind="loha")``): ΔW = (B1 A1) ⊙ (B2 A2) · scale, against a dense fp64 reference built from
``functional.hadamard_delta``, on Linear, every Conv2d geometry and attention; exact merge, files, routing and
what it refuses."""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import peftlite
from peftlite import functional
from peftlite.formats.peft import PeftFormatError
from peftlite.functional import ConvGeometry

sys.path.insert(0, str(Path(__file__).parents[1]))
from _geometries import GEOMETRIES  # noqa: E402
from _merging import assert_merge_cycles, assert_rows_route_as_alone  # noqa: E402
from conftest import assert_matches_reference, randomize_adapters  # noqa: E402

# nonzero factors everywhere (some start at zero), so ΔW is not zero
randomize = functools.partial(randomize_adapters, std=0.3, seed=1)


def dense_delta(pair) -> torch.Tensor:
    """The reference ΔW (out, fan_in), fp64."""
    f = [t.detach().double() for t in (pair.A1, pair.B1, pair.A2, pair.B2)]
    return pair.scale * functional.hadamard_delta(*f)


def test_the_hadamard_pair_is_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    B1, B2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    A, B = functional.hadamard_pair(A1, B1, A2, B2)
    assert A.shape == (9, 7) and B.shape == (5, 9)
    torch.testing.assert_close(B @ A, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)


def test_a_fresh_loha_layer_is_the_base_and_every_factor_trains():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    want = base(x)
    m = peftlite.wrap(nn.Sequential(base), ["0"], rank=3, kind="loha")
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m(x).square().sum().backward()
    pair = m[0].lora["default"]
    assert pair.B2.grad.abs().sum() > 0  # B2 = 0 at the start: the only factor whose gradient is nonzero
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == [
        "0.lora.default.A1", "0.lora.default.A2", "0.lora.default.B1", "0.lora.default.B2"]


def test_linear_values_and_gradients_match_the_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), ["0"], rank=3, alpha=6, kind="loha").double())
    pair = m[0].lora["default"]
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    y = m(x)
    factors = [pair.A1, pair.B1, pair.A2, pair.B2]
    ref = F.linear(x, base.weight + pair.scale * functional.hadamard_delta(*factors), base.bias)
    assert_matches_reference(y, ref, [x, *factors], (1e-12, 1e-12), (1e-10, 1e-12))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_conv_geometry_matches_the_dense_reference(geometry):
    cin, cout, k, stride, padding, dilation, groups, mode, bias = geometry
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, mode).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), ["0"], rank=2, kind="loha").double())
    pair = m[0].lora["default"]
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    y = m(x)
    w = base.weight + dense_delta(pair).reshape(base.weight.shape)
    ref = functional.conv2d(x, w, base.bias, ConvGeometry.of(base))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, g)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(ref, x, g)[0], rtol=1e-10, atol=1e-10)
    m.train()
    m(x.detach()).mul(g).sum().backward()  # the factors get gradients through the conv paths
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (pair.A1, pair.B1, pair.A2, pair.B2))


def test_attention_projections_match_the_dense_reference():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=True).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), nn.MultiheadAttention, rank=2,
                                kind="loha").double())
    ref = copy.deepcopy(base)
    adapted = peftlite.layers.adapted_layers(m)
    assert [n for n, _ in adapted] == ["0", "0.out_proj"]  # the packed in-projection and out_proj, both LoHa
    with torch.no_grad():
        for name, layer in adapted:
            for slot, pair in layer.pairs("default").items():
                w = ref.get_parameter(f"{name[2:]}.{slot}" if name != "0" else slot)
                w.add_(dense_delta(pair).reshape(w.shape))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m[0](x, x, x)[0], ref(x, x, x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_is_the_forward_and_unmerge_is_bit_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    m = randomize(peftlite.wrap(model, ["0", "3"], rank=3, kind="loha")).to(dtype).eval()
    assert_merge_cycles(m, torch.randn(2, 3, 6, 6).to(dtype))


def test_files_round_trip_with_the_kind_and_a_newer_format_version(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(2, 3, 3))
    fresh = copy.deepcopy(base)
    m = randomize(peftlite.wrap(base, ["0"], rank=2, alpha=4, kind="loha"))
    peftlite.save(m, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        config = json.loads(f.metadata()["peftlite"])
        keys = sorted(f.keys())
    assert config["format_version"] == 3 and config["layers"]["0"]["adapter_kind"] == "loha"
    assert keys == ["0.lora.default.A1", "0.lora.default.A2", "0.lora.default.B1", "0.lora.default.B2"]
    peftlite.load(fresh, tmp_path / "a.safetensors")
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh[0](x), m[0](x), rtol=0, atol=0)
    assert isinstance(fresh[0].lora["default"], type(m[0].lora["default"]))
    assert fresh[0].lora["default"].spec == m[0].lora["default"].spec


def test_per_sample_routes_loha_and_lora_rows_as_each_alone():
    torch.manual_seed(0)
    m = randomize(peftlite.wrap(nn.Sequential(nn.Linear(6, 4)), ["0"], rank=2, kind="loha", name="h"))
    peftlite.wrap(m, ["0"], rank=2, name="l")
    randomize(m, seed=2)
    assert_rows_route_as_alone(m, torch.randn(4, 6), ["h", "l", None, "h"])


def test_what_loha_refuses_leaves_the_model_as_it_was(tmp_path):
    with pytest.raises(ValueError, match="variant='dora' is defined for kind='lora' only"):
        peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], kind="loha", variant="dora")
    with pytest.raises(ValueError, match="kind must be one of 'lora', 'loha', 'lokr', got 'boft'"):
        peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], kind="boft")
    torch.manual_seed(0)
    m = randomize(peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, kind="loha", name="a"))
    peftlite.wrap(m, ["0"], rank=2, name="b")
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="combine: 'a' is a loha adapter"):
        peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="ab")
    with pytest.raises(ValueError, match="prepare_hotswap: 'a' is a loha adapter"):
        peftlite.prepare_hotswap(m, max_rank=4)
    peftlite.use(m, "a")
    m[0].lora["a"].rank_scaling = "sqrt"
    with pytest.raises(PeftFormatError, match="LoHa layer with rank_scaling='sqrt'.* save it in peftlite format"):
        peftlite.save(m, tmp_path / "peft_dir", format="peft", name="a")
    m[0].lora["a"].rank_scaling = "linear"
    assert not (tmp_path / "peft_dir").exists()
    assert peftlite.adapters(m) == ["a", "b"]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snapshot.items())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4 * 36, 5)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_a_peft_loha_directory_loads_with_the_outputs_peft_computes(tmp_path, tucker):
    """Checked with the real peft package: its LoHa forward (non-zero init) against peftlite's after load; the
    Tucker form (use_effective_conv2d) read as the flat form of the same ΔW."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _ConvNet().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(
        r=3, alpha=5, target_modules=["lin", "conv"], rank_pattern={"lin": 2}, alpha_pattern={"lin": 3},
        init_weights=False, use_effective_conv2d=tucker)).eval()
    theirs.save_pretrained(tmp_path / "loha")
    x = torch.randn(2, 3, 6, 6)
    ours = copy.deepcopy(base)
    peftlite.load(ours, tmp_path / "loha")
    with torch.no_grad():
        want, got = theirs(x), ours(x)
        assert (want - base(x)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    pairs = {name: layer.lora["default"] for name, layer in peftlite.layers.adapted_layers(ours)}
    assert {n: (p.kind, p.rank, p.alpha) for n, p in pairs.items()} == {"conv": ("loha", 3, 5.0),
                                                                         "lin": ("loha", 2, 3.0)}


def test_peft_loha_options_peftlite_does_not_implement_are_refused_by_name(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    for options, words in (({"rank_dropout": 0.1}, "rank_dropout = 0.1"),
                           ({"module_dropout": 0.2}, "module_dropout = 0.2")):
        folder = tmp_path / str(len(words))
        model = peft.get_peft_model(_ConvNet(), peft.LoHaConfig(r=2, alpha=2, target_modules=["conv"], **options))
        model.save_pretrained(folder)
        target = _ConvNet()
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(PeftFormatError, match=words):
            peftlite.load(target, folder)
        assert not peftlite.layers.adapted_layers(target)
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_a_peftlite_loha_adapter_saved_for_peft_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _ConvNet().eval()
    ours = randomize(peftlite.wrap(copy.deepcopy(base), ["conv", "lin"], rank=3, alpha=5, kind="loha"))
    ours.lin.lora["default"].alpha = 2.0  # another alpha on one layer: written as an alpha_pattern
    peftlite.save(ours, tmp_path / "for_peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "for_peft").eval()
    assert type(theirs.peft_config["default"]).__name__ == "LoHaConfig"
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.eval()(x), rtol=1e-5, atol=1e-6)
    back = copy.deepcopy(base)
    peftlite.load(back, tmp_path / "for_peft")  # and back again
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)
