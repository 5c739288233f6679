"""LoKr (``wrap(..., kind="lokr")``): ΔW = (W1 ⊗ W2) · scale, against a dense fp64 reference built with
``torch.kron``, on Linear, every Conv2d geometry and attention; the split PEFT makes; exact merge, files,
routing and what it refuses."""

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
from safetensors.torch import save_file
from torch import nn

import peftlite
from peftlite import functional
from peftlite.formats.peft import PeftFormatError
from peftlite.functional import ConvGeometry
from peftlite.layers import adapted_layers

sys.path.insert(0, str(Path(__file__).parents[1]))
from _geometries import GEOMETRIES  # noqa: E402
from _merging import assert_merge_cycles, assert_rows_route_as_alone  # noqa: E402
from conftest import assert_matches_reference, randomize_adapters  # noqa: E402

# nonzero factors everywhere (some start at zero), so ΔW is not zero
randomize = functools.partial(randomize_adapters, std=0.3, seed=1)


def factors(pair) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) of a pair, formed here from its parameters (the reference does not call the pair's own)."""
    W1 = pair.W1 if pair.W1 is not None else pair.B1 @ pair.A1
    W2 = pair.W2 if pair.W2 is not None else pair.B2 @ pair.A2
    return W1, W2


def dense_delta(pair) -> torch.Tensor:
    """The reference scale·ΔW (out, fan_in) by ``torch.kron``, fp64."""
    W1, W2 = (f.detach().double() for f in factors(pair))
    return pair.scale * torch.kron(W1, W2)


def test_the_split_is_peft_s():
    assert functional.factorization(256) == (16, 16)
    assert functional.factorization(128) == (8, 16)
    assert functional.factorization(127) == (1, 127)
    assert functional.factorization(128, 4) == (4, 32)
    assert functional.factorization(128, 64) == (64, 2)  # a dividing factor is taken as given, as PEFT does
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert functional.factorization(dim, factor) == peft_lokr.factorization(dim, factor), (dim, factor)


def test_the_kronecker_forms_are_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    W2 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(functional.kron_delta(W1, W2), torch.kron(W1, W2), rtol=0, atol=0)
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    torch.testing.assert_close(functional.kron_linear(x, W1, W2), x @ torch.kron(W1, W2).t(), rtol=1e-12, atol=1e-12)
    for P, Q in ((torch.randn(9, 4, dtype=torch.float64), W2), (W1, torch.randn(2, 6, dtype=torch.float64))):
        # both product orders (the cheaper one is taken by shape)
        torch.testing.assert_close(functional.kron_linear(x, P, Q), x @ torch.kron(P, Q).t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("rank", "decompose_both", "full"), [(1, False, (True, False)), (1, True, (False, False)),
                                                               (2, True, (True, True)), (8, True, (True, True))])
def test_a_fresh_layer_has_peft_s_factors_is_the_base_and_trains(rank, decompose_both, full):
    torch.manual_seed(0)
    base = nn.Linear(12, 16)  # 16 = 4·4, 12 = 3·4: a factor is low-rank below rank 2 = max(4, 4 or 3) / 2
    x = torch.randn(4, 12)
    want = base(x)
    m = peftlite.wrap(nn.Sequential(base), ["0"], rank=rank, kind="lokr", decompose_both=decompose_both)
    pair = m[0].lora["default"]
    assert (pair.kron, pair.full) == ((4, 3), full)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    params = dict(pair.named_parameters())
    assert sorted(params) == sorted((["W1"] if full[0] else ["A1", "B1"]) + (["W2"] if full[1] else ["A2", "B2"]))
    assert all(not params[n].detach().any() for n in params if n in ("W1", "B1"))  # W1 = 0 at the start
    m(x).square().sum().backward()
    assert params["W1" if full[0] else "B1"].grad.abs().sum() > 0


def test_linear_values_and_gradients_match_the_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    for kw in ({"rank": 1}, {"rank": 1, "decompose_both": True}, {"rank": 6}, {"rank": 2, "decompose_factor": 2}):
        m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), ["0"], alpha=3, kind="lokr", **kw).double())
        pair = m[0].lora["default"]
        params = list(pair.parameters())
        x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
        y = m(x)
        W1, W2 = factors(pair)
        ref = F.linear(x, base.weight + pair.scale * torch.kron(W1, W2), base.bias)
        assert_matches_reference(y, ref, [x, *params], (1e-12, 1e-12), (1e-10, 1e-12))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_conv_geometry_matches_the_dense_reference(geometry):
    cin, cout, k, stride, padding, dilation, groups, mode, bias = geometry
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, mode).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), ["0"], rank=1, kind="lokr").double())
    pair = m[0].lora["default"]
    params = list(pair.parameters())
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64, requires_grad=True)
    m.train()
    y = m(x)
    W1, W2 = factors(pair)
    kh, kw = base.kernel_size
    # torch.kron of W1 (out_l, in_m, 1, 1) and W2 (out_k, in_n, kh, kw), as PEFT's make_kron forms a conv's ΔW
    delta = torch.kron(W1[:, :, None, None], W2.reshape(W2.shape[0], -1, kh, kw))
    ref = functional.conv2d(x, base.weight + pair.scale * delta, base.bias, ConvGeometry.of(base))
    assert_matches_reference(y, ref, [x, *params], (1e-10, 1e-10), (1e-9, 1e-9))


def test_attention_projections_and_direct_reads_match_the_dense_reference():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=True).double()
    m = randomize(peftlite.wrap(nn.Sequential(copy.deepcopy(base)), nn.MultiheadAttention, rank=1,
                                kind="lokr").double())
    ref = copy.deepcopy(base)
    adapted = adapted_layers(m)
    assert [n for n, _ in adapted] == ["0", "0.out_proj"]
    with torch.no_grad():
        for name, layer in adapted:
            for slot, pair in layer.pairs("default").items():
                w = ref.get_parameter(f"{name[2:]}.{slot}" if name != "0" else slot)
                w.add_(dense_delta(pair).reshape(w.shape))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m[0](x, x, x)[0], ref(x, x, x)[0], rtol=1e-10, atol=1e-10)
        # a reader of the weight (the effective-weight property) sees W + scale·ΔW too
        torch.testing.assert_close(m[0].out_proj.weight + 0, ref.out_proj.weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_is_the_forward_and_unmerge_is_bit_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.Flatten(), nn.Linear(8 * 36, 6))
    m = randomize(peftlite.wrap(model, [nn.Conv2d, nn.Linear], rank=1, kind="lokr")).to(dtype).eval()
    assert_merge_cycles(m, torch.randn(2, 4, 6, 6).to(dtype))


def test_merge_of_a_lokr_and_a_lora_adapter_together_is_exact_on_every_weight_layout():
    """Both active (their ΔW summed), on a channels_last conv and a Linear whose weight is stored transposed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16, 6))
    model[0].to(memory_format=torch.channels_last)
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data.t().contiguous().t()
    peftlite.wrap(model, [nn.Conv2d, nn.Linear], rank=2, kind="lokr", name="k")
    peftlite.wrap(model, [nn.Conv2d, nn.Linear], rank=2, name="l")
    randomize(model)
    x = torch.randn(2, 4, 4, 4)
    features = torch.randn(2, 6 * 16)
    with torch.no_grad():
        alone = {}
        for name in ("k", "l"):
            peftlite.use(model, name)
            alone[name] = model[2](features)
        peftlite.use(model, ["k", "l"])
        both = model[2](features)
        with peftlite.disabled(model):
            base = model[2](features)
    torch.testing.assert_close(both - base, (alone["k"] - base) + (alone["l"] - base), rtol=1e-5, atol=1e-5)
    assert_merge_cycles(model.eval(), x, cycles=5)


def test_files_round_trip_with_the_split_and_a_newer_format_version(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(4, 6, 3))
    fresh = copy.deepcopy(base)
    m = randomize(peftlite.wrap(base, ["0", "1"], rank=1, alpha=4, kind="lokr", decompose_factor=2))
    peftlite.save(m, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        config = json.loads(f.metadata()["peftlite"])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert config["format_version"] == 4
    assert {n: (e["adapter_kind"], e["kron"], e["full"]) for n, e in config["layers"].items()} == {
        "0": ("lokr", [2, 2], [True, False]), "1": ("lokr", [2, 2], [True, False])}
    assert shapes == {"0.lora.default.W1": (2, 2), "0.lora.default.A2": (1, 3), "0.lora.default.B2": (2, 1),
                      "1.lora.default.W1": (2, 2), "1.lora.default.A2": (1, 18), "1.lora.default.B2": (3, 1)}
    peftlite.load(fresh, tmp_path / "a.safetensors")
    x, xc = torch.randn(3, 6), torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(fresh[0](x), m[0](x), rtol=0, atol=0)
    torch.testing.assert_close(fresh[1](xc), m[1](xc), rtol=0, atol=0)
    assert fresh[1].lora["default"].spec == m[1].lora["default"].spec


def test_a_file_whose_split_does_not_fit_the_model_is_refused_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    m = randomize(peftlite.wrap(nn.Sequential(nn.Linear(6, 4)), ["0"], rank=1, kind="lokr"))
    peftlite.save(m, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        config = json.loads(f.metadata()["peftlite"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config["layers"]["0"]["kron"] = [3, 2]  # 3 does not divide the 4 outputs
    save_file(tensors, tmp_path / "b.safetensors", metadata={"peftlite": json.dumps(config)})
    other = nn.Sequential(nn.Linear(6, 4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"kron=\[3, 2\] does not fit a weight of 4 outputs"):
        peftlite.load(other, tmp_path / "b.safetensors")
    assert not adapted_layers(other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_per_sample_routes_lokr_and_lora_rows_as_each_alone():
    torch.manual_seed(0)
    m = randomize(peftlite.wrap(nn.Sequential(nn.Linear(6, 4)), ["0"], rank=1, kind="lokr", name="k"))
    peftlite.wrap(m, ["0"], rank=2, name="l")
    randomize(m, seed=2)
    assert_rows_route_as_alone(m, torch.randn(4, 6), ["k", "l", None, "k"])


def test_what_lokr_refuses_leaves_the_model_as_it_was():
    with pytest.raises(ValueError, match="variant='dora' is defined for kind='lora' only"):
        peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], kind="lokr", variant="dora")
    with pytest.raises(ValueError, match="decompose_factor must be -1 .* got 0"):
        peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], kind="lokr", decompose_factor=0)
    with pytest.raises(ValueError, match="decompose_both=True is a LoKr field; it needs kind='lokr'"):
        peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], decompose_both=True)
    torch.manual_seed(0)
    m = randomize(peftlite.wrap(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, kind="lokr", name="a"))
    peftlite.wrap(m, ["0"], rank=2, name="b")
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="combine: 'a' is a lokr adapter"):
        peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="ab")
    with pytest.raises(ValueError, match="prepare_hotswap: 'a' is a lokr adapter"):
        peftlite.prepare_hotswap(m, max_rank=4)
    assert peftlite.adapters(m) == ["a", "b"]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snapshot.items())


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.lin = nn.Linear(6 * 36, 12)

    def forward(self, x):
        return self.lin(torch.relu(self.point(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("options", [{"r": 1}, {"r": 2, "decompose_both": True}, {"r": 1, "decompose_factor": 2},
                                     {"r": 8}, {"r": 1, "use_effective_conv2d": True}], ids=str)
def test_a_peft_lokr_directory_loads_with_the_outputs_peft_computes_and_goes_back(tmp_path, options):
    """Checked with the real peft package both ways: its LoKr forward (non-zero init) against peftlite's after
    load, and peftlite's file written for PEFT loaded by PEFT."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _ConvNet().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(
        alpha=3, target_modules=["lin", "conv", "point"], init_weights=False, **options)).eval()
    theirs.save_pretrained(tmp_path / "lokr")
    x = torch.randn(2, 4, 6, 6)
    ours = copy.deepcopy(base)
    peftlite.load(ours, tmp_path / "lokr")
    with torch.no_grad():
        want, got = theirs(x), ours(x)
        assert (want - base(x)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert {p.kind for _, layer in adapted_layers(ours) for p in layer.weight_pairs()} == {"lokr"}
    peftlite.save(ours, tmp_path / "back", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert type(again.peft_config["default"]).__name__ == "LoKrConfig"
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)


def test_a_lokr_adapter_whose_splits_peft_cannot_make_is_refused_for_peft(tmp_path):
    torch.manual_seed(0)
    m = peftlite.wrap(_ConvNet(), ["conv"], rank=1, kind="lokr", decompose_factor=2)
    peftlite.wrap(m, ["lin"], rank=1, kind="lokr", decompose_factor=4)  # another rule on another layer
    with pytest.raises(PeftFormatError, match="no one decompose_factor / decompose_both gives every layer"):
        peftlite.save(m, tmp_path / "d", format="peft")
    assert not (tmp_path / "d").exists()


def test_attention_of_several_widths_and_a_vit_save_and_load_into_fresh_bases(tmp_path):
    """q/k/v of other widths split differently (the entry keeps the rule), and a file whose attention and its
    out_proj have other splits loads in one wrap."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=12, batch_first=True))
    fresh = copy.deepcopy(base)
    m = randomize(peftlite.wrap(base, nn.MultiheadAttention, rank=1, kind="lokr", decompose_factor=3))
    kron = {slot: p.kron for slot, p in m[0].pairs("default").items()}
    assert kron == {"q_proj_weight": (2, 2), "k_proj_weight": (2, 3), "v_proj_weight": (2, 3)}
    peftlite.save(m, tmp_path / "mha.safetensors")
    peftlite.load(fresh, tmp_path / "mha.safetensors")
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh[0](q, k, v)[0], m[0](q, k, v)[0], rtol=0, atol=0)


def test_inspect_shows_each_layer_s_kind_and_split(tmp_path):
    from peftlite import cli
    m = peftlite.wrap(nn.Sequential(nn.Linear(16, 12), nn.Conv2d(4, 6, 3)), ["0"], rank=1, kind="lokr")
    peftlite.wrap(m, ["1"], rank=2, kind="loha")
    peftlite.save(m, tmp_path / "k.safetensors")
    d = cli.describe_file(str(tmp_path / "k.safetensors"))
    layers = {layer["name"]: layer for layer in d["layers"]}
    assert layers["0"]["adapter_kind"] == "lokr" and layers["0"]["adapter_fields"] == {"kron": [3, 4],
                                                                                       "full": [True, False]}
    assert "kron" not in layers["0"]["geometry"] and layers["0"]["geometry"]["in_features"] == 16
    assert layers["1"]["adapter_kind"] == "loha" and "adapter_fields" not in layers["1"]
    text = cli.format_description(d)
    assert [line.split()[:3] for line in text.splitlines()[2:4]] == [["0", "linear", "lokr"], ["1", "conv2d", "loha"]]
    assert "lokr 3x4" in text
