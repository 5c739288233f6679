"""Several named adapters: adapters / use / delete, what trains, merge of the active combination, and
per-sample routing against a loop that runs each row through its own adapter (fp64)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import peftlite
from _geometries import GEOMETRIES
from conftest import assert_unchanged, snapshot
from peftlite.layers import adapted_layers


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for pairs in layer.adapters().values():
                for p in pairs.values():
                    p.A.copy_(torch.randn(p.A.shape, generator=g, dtype=torch.float64).to(p.A.dtype))
                    p.B.copy_(torch.randn(p.B.shape, generator=g, dtype=torch.float64).to(p.B.dtype))
    return model


def mlp(dtype=torch.float64):
    """Three adapters: a on both layers (r=2), b on the first only (r=3), c on both (r=1)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)).to(dtype)
    peftlite.wrap(m, nn.Linear, rank=2, alpha=3.0, name="a")
    peftlite.wrap(m, "0", rank=3, name="b")
    peftlite.wrap(m, nn.Linear, rank=1, alpha=0.5, name="c")
    return randomize(m)


def outputs(model, x, spec):
    peftlite.use(model, spec)
    with torch.no_grad():
        return model(x)


def test_names_in_creation_order_and_the_wrapped_one_is_active():
    m = mlp()
    assert peftlite.adapters(m) == ["a", "b", "c"]
    assert peftlite.switching.active(m) == {"c": 1.0}  # wrap(name=new) makes the new adapter the active one
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trains == {"0.lora.c.A", "0.lora.c.B", "2.lora.c.A", "2.lora.c.B"}
    peftlite.wrap(m, "2", rank=3, name="b")  # an existing name on more layers: the active set stays
    assert peftlite.switching.active(m) == {"c": 1.0}
    with pytest.raises(ValueError, match="module '0' already has an adapter named 'a'"):
        peftlite.wrap(m, "0", name="a")


def test_use_sums_and_weights_as_the_dense_reference():
    m = mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    with peftlite.disabled(m):
        base = m(x)
    l0, l2 = m[0], m[2]

    def dense(weights):
        h = x
        for layer, act in ((l0, torch.tanh), (l2, None)):
            w = layer._parameters["weight"].clone()
            for name, wt in weights.items():
                if name in layer.lora:
                    p = layer.pairs(name)["weight"]
                    w += wt * p.scale * p.B @ p.A
            h = nn.functional.linear(h, w, layer.bias)
            h = act(h) if act else h
        return h

    torch.testing.assert_close(outputs(m, x, None), base, rtol=0, atol=0)
    cases = (("b", {"b": 1}), (["a", "c"], {"a": 1, "c": 1}), ({"a": 0.7, "b": -0.3}, {"a": 0.7, "b": -0.3}))
    for spec, weights in cases:
        torch.testing.assert_close(outputs(m, x, spec), dense(weights), rtol=1e-12, atol=1e-12)
        trains = {n.split(".")[2] for n, p in m.named_parameters() if p.requires_grad}
        assert trains == set(weights)


def test_use_sets_requires_grad_on_adapters_only_overriding_freeze():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    peftlite.wrap(m, "0", name="a", heads={"1": nn.Linear(4, 3)})
    peftlite.wrap(m, "0", name="b")
    peftlite.freeze(m, "*.lora.*")
    with pytest.warns(UserWarning, match=r"not saved by peftlite\.save \(0\.weight\)"):
        peftlite.unfreeze(m, "0.weight")
    peftlite.use(m, "a")
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trains == {"0.lora.a.A", "0.lora.a.B", "1.weight", "1.bias", "0.weight"}  # heads, base keep theirs
    groups = peftlite.param_groups(m, 1e-3)
    assert sum(len(g["params"]) for g in groups) == 5
    assert "a*:8 b:8" in str(peftlite.summary(m))


def test_bad_names_and_refusals_change_nothing():
    m = mlp()
    snap = snapshot(m)
    with pytest.raises(KeyError, match=r"use: no adapter named 'z'; the model has 'a', 'b', 'c'"):
        peftlite.use(m, ["a", "z"])
    with pytest.raises(KeyError, match="delete: no adapter named 'z'"):
        peftlite.delete(m, "z")
    with pytest.raises(ValueError, match="names an adapter twice"):
        peftlite.use(m, ["a", "a"])
    with pytest.raises(ValueError, match="weight nan for 'a' is not a finite number"):
        peftlite.use(m, {"a": float("nan")})
    with pytest.raises(ValueError, match="adapter name 'x.y' must be a non-empty string without dots"):
        peftlite.wrap(m, "0", name="x.y")
    assert_unchanged(m, snap)
    peftlite.merge(m)
    snap = snapshot(m)
    for call in (lambda: peftlite.use(m, "a"), lambda: peftlite.delete(m, "a"),
                 lambda: peftlite.per_sample(m, ["a"]).__enter__()):
        with pytest.raises(RuntimeError, match="the model is merged"):
            call()
    with pytest.raises(ValueError, match="wrap: the model is merged"):
        peftlite.wrap(m, "2", name="d")
    assert_unchanged(m, snap)
    peftlite.unmerge(m)
    with peftlite.per_sample(m, ["a"]), pytest.raises(RuntimeError, match="merge: inside peftlite.per_sample"):
        peftlite.merge(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_folds_the_active_combination_and_unmerges_bit_exactly(dtype):
    m = mlp(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    want = outputs(m, x, {"a": 0.5, "b": 1.0, "c": -2.0})
    for _ in range(20):
        peftlite.merge(m)
        with torch.no_grad():
            got = m(x)
        peftlite.unmerge(m)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)
    for k, v in m.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype != torch.uint8 else v,
                           before[k].view(torch.uint8) if v.dtype != torch.uint8 else before[k]), k


def test_delete_and_unwrap_with_several():
    m = mlp()
    peftlite.use(m, ["a", "c"])
    peftlite.delete(m, "a")
    assert peftlite.adapters(m) == ["b", "c"] and peftlite.switching.active(m) == {"c": 1.0}
    assert "a" not in m[0].lora and "a" not in m[2].lora
    peftlite.delete(m, "c")
    assert type(m[2]) is nn.Linear  # its last adapter gone: the layer's own class again
    x = torch.randn(3, 6, dtype=torch.float64)
    want = outputs(m, x, "b")
    plain = peftlite.unwrap(m, merge=True)  # the active combination merged, the others dropped
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-12, atol=1e-12)


# ---- per-sample routing --------------------------------------------------------------------------

def each_row(model, x, route):
    """The reference: every row through its own adapter (None: the base), one row at a time."""
    rows = []
    for i, name in enumerate(route):
        peftlite.use(model, name)
        with torch.no_grad():
            rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("shape", [(6,), (3, 6)], ids=["rows", "tokens"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_linear_routing_equals_each_row_through_its_own_adapter(shape, grad):
    m = mlp()
    route = ["a", "b", None, "c", "a", "b", "c"]
    x = torch.randn(len(route), *shape, dtype=torch.float64)
    want = each_row(m, x, route)
    peftlite.use(m, ["a", "b", "c"])
    with torch.set_grad_enabled(grad), peftlite.per_sample(m, route):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_routing_float32_c_kernel_equals_the_loop():
    m = mlp(torch.float32)
    route = ["c", "a", None, "b", "b", "a"] * 3
    x = torch.randn(len(route), 6)
    want = each_row(m, x, route)
    with torch.no_grad(), peftlite.per_sample(m, route):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_conv_routing_every_geometry(geom):
    cin, cout, k, s, p, d, g, mode, bias = geom
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode)).double()
    peftlite.wrap(m, "0", rank=2, name="a")
    peftlite.wrap(m, "0", rank=3, alpha=1.5, name="b")
    randomize(m)
    route = ["b", None, "a", "b"]
    x = torch.randn(len(route), cin, 7, 9, dtype=torch.float64)
    want = each_row(m, x, route)
    with torch.no_grad(), peftlite.per_sample(m, route):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_routing_layers_holding_the_same_adapters_in_another_order():
    # Layers share one route's index tensors only when they hold the same names in the same order.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    peftlite.wrap(m, ["0", "4"], rank=2, name="a")
    peftlite.wrap(m, nn.Linear, rank=3, name="b")
    peftlite.wrap(m, "2", rank=1, alpha=2.0, name="a")  # layer 2 holds (b, a); layers 0 and 4 hold (a, b)
    randomize(m)
    assert list(m[0].lora) == list(m[4].lora) == ["a", "b"] and list(m[2].lora) == ["b", "a"]
    route = ["a", "b", None, "b", "a"]
    x = torch.randn(len(route), 6, dtype=torch.float64)
    want = each_row(m, x, route)
    with torch.no_grad(), peftlite.per_sample(m, route):
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_routing_backward_trains_every_routed_adapter():
    m = mlp()
    peftlite.use(m, ["a", "b"])  # both require grad; the route decides who computes what
    route = ["a", "b", "b", None]
    x = torch.randn(4, 6, dtype=torch.float64)
    with peftlite.per_sample(m, route):
        m(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert set(got) == {"0.lora.a.A", "0.lora.a.B", "2.lora.a.A", "2.lora.a.B", "0.lora.b.A", "0.lora.b.B"}
    m.zero_grad()
    for i, name in enumerate(route):  # the same loss, row by row through each row's own adapter
        if name is not None:  # a base row gives the adapters no gradient
            peftlite.use(m, name)
            m(x[i:i + 1]).square().sum().backward()
    for n, g in got.items():
        torch.testing.assert_close(g, dict(m.named_parameters())[n].grad, rtol=1e-10, atol=1e-12)


def test_route_errors():
    m = mlp()
    with pytest.raises(KeyError, match="per_sample: no adapter named 'z'"):
        with peftlite.per_sample(m, ["a", "z"]):
            pass
    with pytest.raises(TypeError, match="one adapter name .or None. per batch row, as a list"):
        with peftlite.per_sample(m, "a"):
            pass
    with peftlite.per_sample(m, ["a", "b"]), pytest.raises(ValueError, match=r"route has 2 entries but the batch "
                                                                                 r"reaching 0 has 3 rows"):
        m(torch.randn(3, 6, dtype=torch.float64))


def test_attention_is_refused_by_name_and_other_layers_route():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "fc": nn.Linear(8, 8)})
    peftlite.wrap(model, "attn", rank=2, name="a")
    peftlite.wrap(model, "fc", rank=2, name="b")
    with pytest.raises(ValueError, match=r"per_sample: attn \(LoraMultiheadAttention\) computes with its weight"):
        with peftlite.per_sample(model, ["a", "b"]):
            pass
    with peftlite.per_sample(model, ["b", None]):  # attn's adapters are not routed: it computes its base
        x = torch.randn(2, 3, 8)
        model["attn"](x, x, x)
        model["fc"](x)


def test_routes_are_per_thread():
    m = mlp()
    x = torch.randn(2, 6, dtype=torch.float64)
    routes = {0: ["a", "b"], 1: ["c", None], 2: [None, "a"]}
    want = {i: each_row(m, x, r) for i, r in routes.items()}
    got, barrier = {}, threading.Barrier(len(routes))

    def serve(i):
        with peftlite.per_sample(m, routes[i]):
            barrier.wait()  # all three routes are in force at once
            for _ in range(20):
                with torch.no_grad():
                    got[i] = m(x)

    threads = [threading.Thread(target=serve, args=(i,)) for i in routes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in routes:
        torch.testing.assert_close(got[i], want[i], rtol=1e-12, atol=1e-12)


def test_routing_compiles_once_without_graph_breaks():
    from torch._dynamo.utils import counters

    m = mlp(torch.float32)
    x = torch.randn(4, 6)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    for route in (["a", "b", None, "c"], ["c", "c", "a", None], [None] * 4, ["b", "a", "b", "a"]):
        with torch.no_grad(), peftlite.per_sample(m, route):
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    with peftlite.per_sample(m, ["a", "b", None, "c"]):
        assert torch._dynamo.explain(m)(x).graph_break_count == 0


def test_every_state_refusal_is_one_exception_type_that_old_except_clauses_catch():
    """Merged, routed or disabled: wrap, use, delete, combine, merge and hot-swapping refuse with
    AdapterStateError, a ValueError and a RuntimeError at once."""
    assert issubclass(peftlite.AdapterStateError, ValueError) and issubclass(peftlite.AdapterStateError, RuntimeError)
    torch.manual_seed(0)
    m = peftlite.wrap(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), ["0", "1"], rank=2, name="a")
    peftlite.wrap(m, ["0"], rank=2, name="b")
    peftlite.merge(m)
    calls = {
        "wrap": lambda: peftlite.wrap(m, ["1"], rank=2, name="c"),
        "use": lambda: peftlite.use(m, "a"),
        "combine": lambda: peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="ab"),
        "prepare_hotswap": lambda: peftlite.prepare_hotswap(m, max_rank=4),
    }
    for call in calls.values():
        with pytest.raises(peftlite.AdapterStateError, match="merged"):
            call()
    peftlite.unmerge(m)
    with peftlite.per_sample(m, ["a"]):
        for call in (lambda: peftlite.merge(m), lambda: peftlite.delete(m, "b"), lambda: peftlite.use(m, "b")):
            with pytest.raises(peftlite.AdapterStateError, match="per_sample"):
                call()
    with peftlite.disabled(m), pytest.raises(peftlite.AdapterStateError, match="disabled"):
        peftlite.merge(m)
