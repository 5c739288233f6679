"""AdapterSpec: the one validation of an adapter's hyper-parameters, the one scale formula, and file entries."""

from __future__ import annotations

import math

import pytest

import peftlite
from peftlite.demo.digits import tiny_resnet
from peftlite.layers.spec import AdapterSpec, is_positive, scale_of


@pytest.mark.parametrize("rank, alpha, rank_scaling, expected", [
    (4, 8.0, "linear", 2.0), (4, 8.0, "sqrt", 4.0), (16, None, "linear", 1.0), (16, None, "sqrt", 4.0),
    (3, 1.5, "sqrt", 1.5 / math.sqrt(3)),
])
def test_scale_is_alpha_over_rank_or_its_square_root(rank, alpha, rank_scaling, expected):
    spec = AdapterSpec(rank=rank, alpha=alpha, rank_scaling=rank_scaling)
    assert spec.scale == pytest.approx(expected, rel=1e-15) and spec.scale == scale_of(spec.alpha, rank, rank_scaling)
    assert spec.alpha == (rank if alpha is None else alpha)


def test_every_pair_wrap_builds_computes_with_the_specs_scale():
    model = peftlite.wrap(tiny_resnet(), "layer3.*", rank=4, alpha=6, rank_scaling="sqrt")
    pairs = [m.lora["default"] for _, m in peftlite.layers.adapted_layers(model)]
    assert pairs and all(p.scale == 3.0 and p.spec == AdapterSpec(rank=4, alpha=6, rank_scaling="sqrt")
                         for p in pairs)


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": 2.0}, "rank must be a positive integer, got 2.0"),
    ({"rank": True}, "rank must be a positive integer, got True"),
    ({"alpha": float("nan")}, "alpha must be a positive finite number"),
    ({"alpha": -1}, "alpha must be a positive finite number"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ({"variant": "vera"}, "variant must be one of 'lora', 'dora', got 'vera'"),
    ({"kind": "oft"}, "kind must be one of 'lora', 'loha', 'lokr', got 'oft'"),
    ({"init": "gaussian"}, "init must be one of 'default', 'pissa', 'olora' or 'pissa_niter_N'"),
    ({"init": "pissa", "variant": "dora"}, "init='pissa' is defined for plain LoRA only"),
    ({"rank_scaling": "log"}, r"rank_scaling must be 'linear' .* or 'sqrt' .*got 'log'"),
])
def test_bad_values_are_refused_with_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AdapterSpec(**kwargs)


def test_a_file_entry_round_trips_and_a_bad_one_names_its_layer():
    for spec in (AdapterSpec(rank=4), AdapterSpec(rank=8, alpha=2.5, dropout=0.1, variant="dora",
                                                   rank_scaling="sqrt")):
        assert AdapterSpec.from_entry(spec.entry()) == spec
    assert AdapterSpec(rank=4).entry() == {"rank": 4, "alpha": 4.0, "dropout": 0.0}  # older readers' fields only
    with pytest.raises(ValueError, match=r"layer 'fc': rank must be a positive integer, got -2"):
        AdapterSpec.from_entry({"rank": -2, "alpha": 1.0}, "layer 'fc'")
    with pytest.raises(ValueError, match=r"layer 'fc': no alpha"):
        AdapterSpec.from_entry({"rank": 2}, "layer 'fc'")


def test_is_positive_refuses_what_json_can_hold():
    assert is_positive(1) and is_positive(0.5) and is_positive(3, integral=True)
    for bad in (0, -1, True, float("nan"), float("inf"), "1", None, 10 ** 400):
        assert not is_positive(bad), bad
    assert not is_positive(2.0, integral=True)
