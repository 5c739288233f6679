"""Hot-swapping into a compiled model: zero graph breaks, one graph for swaps of ranks, alphas and target
sets within the union, outputs equal to eager (and to a model that loaded the file), bad files refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import peftlite
from conftest import assert_unchanged, snapshot
from test_switching import randomize


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def adapter_file(tmp_path, name, targets, rank, alpha, seed):
    m = peftlite.wrap(base(), targets, rank=rank, alpha=alpha)
    randomize(m, seed)
    return peftlite.save(m, tmp_path / f"{name}.safetensors"), m


def test_swaps_recompile_nothing_and_equal_eager(tmp_path):
    x = torch.randn(5, 8)
    served = peftlite.wrap(base(), "0", rank=2)
    peftlite.prepare_hotswap(served, max_rank=8, targets=nn.Linear)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(served, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(x)
    files = [adapter_file(tmp_path, "r4", nn.Linear, 4, 3.0, 1), adapter_file(tmp_path, "r8", ["3"], 8, 16.0, 2),
             adapter_file(tmp_path, "r1", ["0", "5"], 1, 0.5, 3), adapter_file(tmp_path, "r2", "0", 2, 2.0, 4)]
    for path, reference in files:
        peftlite.hotswap(served, path)
        with torch.no_grad():
            want = reference(x)
            torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(served(x), want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.explain(served)(x).graph_break_count == 0


def test_saving_after_swaps_gives_the_swapped_adapter(tmp_path):
    path, reference = adapter_file(tmp_path, "r4", ["3"], 4, 3.0, 1)
    served = peftlite.prepare_hotswap(peftlite.wrap(base(), "0", rank=2), max_rank=8, targets=nn.Linear)
    peftlite.hotswap(served, path)
    again = peftlite.load(base(), peftlite.save(served, tmp_path / "back.safetensors"))
    assert [n for n, _ in peftlite.layers.adapted_layers(again)] == ["3"]  # layers that are off are left out
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), reference(x), rtol=1e-5, atol=1e-6)


def test_bad_files_are_refused_and_change_nothing(tmp_path):
    served = peftlite.wrap(base(), "0", rank=2)
    with pytest.raises(RuntimeError, match=r"hotswap: call peftlite.prepare_hotswap"):
        peftlite.hotswap(served, adapter_file(tmp_path, "x", "0", 2, 2.0, 0)[0])
    with pytest.raises(ValueError, match="adapter 'default' has rank 2 on 0 .weight., above max_rank=1"):
        peftlite.prepare_hotswap(served, max_rank=1)
    peftlite.prepare_hotswap(served, max_rank=4, targets=["3"])
    snap = snapshot(served)
    big, _ = adapter_file(tmp_path, "big", "3", 8, 2.0, 0)
    with pytest.raises(ValueError, match="has rank 8 on 3, above max_rank=4"):
        peftlite.hotswap(served, big)
    outside, _ = adapter_file(tmp_path, "outside", "5", 2, 2.0, 0)
    with pytest.raises(ValueError, match="adapts '5', outside the layers prepared for hot-swapping"):
        peftlite.hotswap(served, outside)
    with pytest.raises(KeyError, match="hotswap: no adapter named 'b'"):
        peftlite.hotswap(served, big, name="b")
    wrong = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    wrong_file = peftlite.save(peftlite.wrap(wrong, "3", rank=2), tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="geometry differs"):
        peftlite.hotswap(served, wrong_file)
    assert_unchanged(served, snap)
