"""Merge state: exact unmerge over many cycles, all-or-nothing merges, and survival through copies and moves."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from _kernel_checks import sequential_delta
from conftest import assert_unchanged, randomize_adapters, snapshot


def model_and_input(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, padding=1),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).to(dtype).eval()
    peftlite.wrap(model, (nn.Conv2d, nn.Linear), rank=3)
    randomize_adapters(model, std=0.2, seed=seed)
    return model, torch.randn(2, 3, 6, 6, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_unmerge_is_bit_exact_over_many_cycles(dtype):
    model, _ = model_and_input(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(200):
        peftlite.merge(model)
        peftlite.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_weight_is_the_single_rounded_sum(dtype):
    model, _ = model_and_input(dtype)
    conv = model[0]
    pair = conv.lora.default
    w = conv._parameters["weight"].detach().clone()
    want = (w.float() + sequential_delta(pair.A, pair.B, pair.scale).reshape(w.shape)).to(dtype)
    near = (w.float() + pair.scale * (pair.B.float() @ pair.A.float()).reshape(w.shape)).to(dtype)
    peftlite.merge(model)
    assert torch.equal(conv._parameters["weight"], want)  # ΔW in the documented order, then one rounding
    torch.testing.assert_close(conv._parameters["weight"], near, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_repeats_warn_and_do_nothing():
    model, _ = model_and_input()
    with pytest.warns(UserWarning, match="not merged; nothing to do"):
        peftlite.unmerge(model)
    peftlite.merge(model)
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="already merged; nothing to do"):
        peftlite.merge(model)
    assert_unchanged(model, snap)


def test_non_finite_adapter_refuses_to_merge():
    model, x = model_and_input()
    with torch.no_grad():
        model[2].lora.default.B[0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot merge 2: its adapter B for 'weight' holds non-finite values "
                                         r"\(1 of 24, adapter 'default'\); the model is unchanged"):
        peftlite.merge(model)
    assert_unchanged(model, snap)
    assert not model[0].adapter_state.merged


def test_fp16_overflow_rolls_back_every_layer():
    model, x = model_and_input(torch.float16)
    with torch.no_grad():
        model[4].lora.default.B.fill_(1e5)  # scale·ΔW far beyond fp16's max; layers 0 and 2 merge first
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot merge 4: .*non-finite .*overflows torch\.float16\); the weight is "
                                         r"unchanged"):
        peftlite.merge(model)
    assert_unchanged(model, snap)
    assert not any(m.adapter_state.merged for m in (model[0], model[2], model[4]))


def test_train_and_eval_never_merge():
    model, x = model_and_input()
    peftlite.merge(model)
    model.train()
    model.eval()
    assert model[0].adapter_state.merged
    peftlite.unmerge(model)
    model.train()
    assert not model[0].adapter_state.merged


def test_deepcopy_merged_and_unmerged():
    model, x = model_and_input()
    with torch.no_grad():
        y = model(x)
    peftlite.merge(model)
    twin = copy.deepcopy(model)
    peftlite.unmerge(twin)  # the copy carries its own exact record
    assert model[0].adapter_state.merged and twin[0]._parameters["weight"] is not model[0]._parameters["weight"]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_merged_state_travels_with_the_state_dict():
    merged, x = model_and_input()
    with torch.no_grad():
        y = merged(x)
    peftlite.merge(merged)
    sd = merged.state_dict()
    assert sd["0._extra_state"].tolist() == [1]
    fresh, _ = model_and_input()  # same seed: same base and adapters, unmerged
    fresh.load_state_dict(sd)
    assert fresh[0].adapter_state.merged  # restored, so ΔW is not applied a second time
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="came from a state_dict"):
        peftlite.unmerge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-6)
    # and an unmerged state_dict into a merged wrapper unmerges it
    unmerged_sd = fresh.state_dict()
    assert merged[0].adapter_state.merged
    merged.load_state_dict(unmerged_sd)
    assert not merged[0].adapter_state.merged


def test_to_dtype_while_unmerged_and_refusal_while_merged():
    model, x = model_and_input()
    model.to(torch.float64)
    assert model[0].lora.default.A.dtype == torch.float64
    peftlite.merge(model)
    peftlite.unmerge(model)
    peftlite.merge(model)
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match=r"merged as torch\.float64 .* but the weight is now torch\.float32"):
        peftlite.unmerge(model)


def test_channels_last_merge_goes_through_a_view():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval().to(memory_format=torch.channels_last)
    peftlite.wrap(model, nn.Conv2d, rank=4)
    randomize_adapters(model)
    conv = model.layer2[0].conv1
    assert conv._parameters["weight"].is_contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x)
        peftlite.merge(model)
        assert not torch.equal(conv._parameters["weight"], before["layer2.0.conv1.weight"])  # not lost in a copy
        assert conv._parameters["weight"].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        peftlite.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_disabled_gives_base_behaviour_and_restores_merge():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with torch.no_grad():
        base_out = plain(x)
    model = peftlite.wrap(copy.deepcopy(plain), nn.Linear, rank=2)
    randomize_adapters(model, std=0.5)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base_out)
        with peftlite.disabled(model):
            assert torch.equal(model(x), base_out)
        peftlite.merge(model)
        merged_w = model[0]._parameters["weight"].clone()
        with peftlite.disabled(model):
            assert torch.equal(model(x), base_out)
            with pytest.raises(RuntimeError, match="inside peftlite.disabled"):
                peftlite.merge(model)
        assert torch.equal(model[0]._parameters["weight"], merged_w)
    plain_again = peftlite.unwrap(model, merge=False)
    with torch.no_grad():
        assert torch.equal(plain_again(x), base_out)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom("kernel failed"), ValueError("no in-place matrix view")],
                         ids=["runtime", "value"])
def test_any_error_on_a_later_layer_unmerges_the_earlier_ones(monkeypatch, error):
    model, x = model_and_input(torch.bfloat16)
    snap = snapshot(model)
    real = peftlite.kernels.merge_
    calls = []

    def failing(weight, *args, **kwargs):
        calls.append(weight.shape)
        if len(calls) == 3:  # layers 0 and 2 are merged by now
            raise error
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(peftlite.kernels, "merge_", failing)
    with pytest.raises(type(error), match=r"cannot merge 4 \(every layer is unmerged again\): "):
        peftlite.merge(model)
    assert len(calls) == 3
    assert_unchanged(model, snap)  # bit-exact: the merged layers were unmerged from their records
    assert not any(m.adapter_state.merged for m in (model[0], model[2], model[4]))
    with pytest.raises(type(error), match="cannot merge 4"):
        calls.clear()
        peftlite.unwrap(model, merge=True)
    assert_unchanged(model, snap)  # still wrapped, unmerged
    monkeypatch.setattr(peftlite.kernels, "merge_", real)
    peftlite.merge(model)
    peftlite.unmerge(model)
    assert_unchanged(model, snap)


def test_unwrap_merge_with_a_non_finite_adapter_leaves_the_model_wrapped():
    model, _ = model_and_input()
    with torch.no_grad():
        model[4].lora.default.A[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot merge 4: its adapter A"):
        peftlite.unwrap(model, merge=True)
    assert_unchanged(model, snap)
    assert "_peftlite" in model.__dict__
