"""Compiled training: a wrapped CNN and a wrapped transformer block train under torch.compile(fullgraph=True)
with no graph break and the eager losses; merge, unmerge, disabled and use after compiling recompile
rather than run a stale graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import peftlite
from peftlite.demo.digits import tiny_resnet


class Block(nn.Module):
    """A transformer block: attention (nn.MultiheadAttention) and an MLP, pre-norm."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def cnn():
    torch.manual_seed(0)
    return peftlite.wrap(tiny_resnet(4), nn.Conv2d, rank=2, heads={"fc": nn.Linear(64, 3)})


def transformer():
    torch.manual_seed(0)
    return peftlite.wrap(Block(), [nn.MultiheadAttention, "mlp.*"], rank=2, heads={"head": nn.Linear(16, 3)})


def losses(model, x, y, steps, compile_it):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
    out = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(run(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("make, shape", [(cnn, (4, 1, 16, 16)), (transformer, (4, 5, 16))], ids=["resnet", "block"])
def test_compiled_training_matches_eager_without_graph_breaks(make, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    eager, compiled = make(), make()
    assert torch._dynamo.explain(copy.deepcopy(compiled))(x).graph_break_count == 0
    torch._dynamo.reset()
    want = losses(eager, x, y, 3, False)
    got = losses(compiled, x, y, 3, True)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert want[-1] < want[0]  # it trains


def test_state_changes_after_compiling_recompile_and_are_never_stale():
    model = transformer().eval()
    peftlite.wrap(model, "mlp.0", rank=2, name="b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.3)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager")

    def check():
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)

    check()
    with peftlite.disabled(model):
        check()  # adapters off: a new graph, not the old one
    peftlite.use(model, "default")
    check()
    peftlite.use(model, ["default", "b"])
    check()
    peftlite.merge(model)
    check()
    peftlite.unmerge(model)
    check()
    with torch.no_grad():
        model.mlp[0].pairs("b")["weight"].B.mul_(2)  # a value change needs no recompile: same graph, new values
    check()
    assert counters["stats"]["unique_graphs"] >= 4  # disabled, use x2 and merge each needed their own
