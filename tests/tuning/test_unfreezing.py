"""Unfreezer: stages really train from their epoch on, nothing frozen moves, schedulers and resuming work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftlite
from peftlite.demo.digits import tiny_resnet

SCHEDULE = {0: ["fc"], 1: ["layer3"], 2: ["layer2", "layer1.0.conv1"]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These training loops use tiny tensors, where intra-op threads only add synchronisation; on a loaded
    2-core machine they made this module about 100 times slower (0.2 s -> 20 s per resume test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = tiny_resnet(5)
    peftlite.freeze(model)
    peftlite.unfreeze(model, "fc")
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2, weight_decay=0.1))
    unfreezer = peftlite.Unfreezer(model, opt, SCHEDULE, lr=1e-3)
    return model, opt, unfreezer


def _stage_of(model) -> dict[str, int]:
    """Independent reference: the epoch each parameter trains from, by plain string prefixes."""
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("fc."):
            out[name] = 0
        elif name.startswith("layer3."):
            out[name] = 1
        elif name.startswith("layer2.") or name == "layer1.0.conv1.weight":
            out[name] = 2
    return out


def _batches(epoch, n=2):
    g = torch.Generator().manual_seed(100 + epoch)
    return [(torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(n)]


def _epoch(model, opt, sched, epoch):
    model.train()
    for x, y in _batches(epoch):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_registers_every_stage_once_with_its_lr_and_freezes_it():
    model, opt, unfreezer = _setup()
    stage = _stage_of(model)
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held))
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in stage} <= set(held)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, epoch in stage.items():
        assert lr_of[id(params[name])] == (1e-2 if epoch == 0 else 1e-3), name  # fc keeps its own group
        assert not params[name].requires_grad
    assert all(g["name"].startswith("unfreeze@") for g in opt.param_groups[2:])
    assert unfreezer.added == [g["name"] for g in opt.param_groups[2:]]


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cosine"])
def test_newly_unfrozen_params_train_and_frozen_ones_do_not(kind):
    model, opt, unfreezer = _setup()
    epochs, steps = 4, 2
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    elif kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=epochs * steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    stage = _stage_of(model)
    initial = [g["lr"] for g in opt.param_groups]
    for epoch in range(epochs):
        unfreezer.step(epoch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _epoch(model, opt, sched, epoch)
        for name, p in model.named_parameters():
            trains = name in stage and stage[name] <= epoch
            assert torch.equal(p, before[name]) != trains, (kind, epoch, name)
    if kind == "lambda":  # every group, added ones included, follows the lambda
        want = [lr * 0.5 ** (epochs * steps) for lr in initial]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want)
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_step_is_a_function_of_the_epoch():
    model, _, unfreezer = _setup()
    stage = _stage_of(model)
    assert sorted(unfreezer.step(2)) == sorted(stage)
    assert unfreezer.step(2) == []
    unfreezer.step(0)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad == (e == 0) for n, e in stage.items())


def _run(epochs, resume_at=None, order=("unfreezer", "opt", "sched")):
    model, opt, unfreezer = _setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    for epoch in range(epochs):
        if epoch == resume_at:  # save, rebuild everything from scratch, restore, continue
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                   "unfreezer": unfreezer.state_dict(), "sched": sched.state_dict()})
            model, opt, unfreezer = _setup(seed=1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
            model.load_state_dict(saved["model"])
            for part in order:
                {"unfreezer": unfreezer, "opt": opt, "sched": sched}[part].load_state_dict(saved[part])
            assert unfreezer.epoch == epoch - 1
        unfreezer.step(epoch)
        _epoch(model, opt, sched, epoch)
    return model


@pytest.mark.parametrize("order", [("unfreezer", "opt", "sched"), ("sched", "opt", "unfreezer")])
def test_resume_continues_the_schedule_exactly(order):
    straight = _run(4)
    resumed = _run(4, resume_at=2, order=order)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_is_plain_and_refuses_another_schedule():
    model, opt, unfreezer = _setup()
    unfreezer.step(1)
    state = unfreezer.state_dict()
    assert state["epoch"] == 1 and sorted(state["stages"]) == [0, 1, 2]
    net = tiny_resnet(5)
    other = peftlite.Unfreezer(net, torch.optim.SGD(net.parameters(), lr=0.1), {0: ["fc"]})
    with pytest.raises(ValueError, match="schedule differs"):
        other.load_state_dict(state)


def test_optimizer_built_with_named_params_gets_named_groups():
    model = tiny_resnet(5)
    peftlite.freeze(model)
    peftlite.unfreeze(model, "fc")
    opt = torch.optim.SGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.1)
    peftlite.Unfreezer(model, opt, {1: ["layer3.0.conv1"]})
    assert opt.param_groups[-1]["param_names"] == ["layer3.0.conv1.weight"]
    assert opt.param_groups[-1]["lr"] == 0.1  # the optimizer's default


def test_adapters_outside_the_schedule_keep_training():
    torch.manual_seed(0)
    model = peftlite.wrap(tiny_resnet(5), "layer3.*", rank=2, trainable=["fc"])
    opt = torch.optim.SGD(peftlite.param_groups(model, 0.1), lr=0.1)
    with pytest.warns(UserWarning, match="not saved by"):  # layer2 base weights are not in the adapter file
        unfreezer = peftlite.Unfreezer(model, opt, {1: ["layer2"]})
    unfreezer.step(0)
    lora = {n for n, p in model.named_parameters() if ".lora." in n}
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if n in lora)


# ---- errors: clear, and nothing changes --------------------------------------------------------

def _snapshot(model, opt):
    return ([p.requires_grad for p in model.parameters()],
            [(g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups])


@pytest.mark.parametrize("schedule, error, text", [
    ({-1: ["fc"]}, ValueError, "epoch -1"),
    ({1.5: ["fc"]}, ValueError, "epoch 1.5"),
    ({0: ["fc"], 2: ["layer9"]}, ValueError, r"schedule\[2\]: .layer9. names no module or tensor .*match: .layer\d"),
    ({0: ["layer3"], 2: ["layer3.0.conv1"]}, ValueError,
     "'layer3.0.conv1.weight' is in two stages .epochs 0 and 2"),
    ({0: []}, ValueError, "schedule.0. is empty"),
    ({}, TypeError, "non-empty dict"),
    ({0: [3]}, TypeError, "is not a pattern"),
])
def test_bad_schedules_raise_and_change_nothing(schedule, error, text):
    model = tiny_resnet(5)
    peftlite.freeze(model, "layer1")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = _snapshot(model, opt)
    with pytest.raises(error, match=text):
        peftlite.Unfreezer(model, opt, schedule)
    assert _snapshot(model, opt) == before


def test_scheduler_before_unfreezer_is_refused():
    model = tiny_resnet(5)
    peftlite.freeze(model)
    peftlite.unfreeze(model, "fc")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="create the Unfreezer before the scheduler"):
        peftlite.Unfreezer(model, opt, {2: ["layer3"]})
    assert _snapshot(model, opt) == before


def test_bad_step_epoch():
    _, _, unfreezer = _setup()
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        unfreezer.step(-1)
