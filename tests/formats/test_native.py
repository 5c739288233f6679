"""Adapter files: one safetensors file, config in metadata, atomic save, validate-before-touch load."""

import json
import os

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

import peftlite
from conftest import assert_unchanged, randomize_adapters, snapshot
from peftlite import AdapterFileError


def base():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def trained(tmp_path, **kw):
    model = peftlite.wrap(base(), "layer4.*", rank=4, heads={"fc": nn.Linear(512, 3)}, **kw)
    randomize_adapters(model)
    path = peftlite.save(model, tmp_path / "adapter.safetensors")
    return model, path


X = torch.randn(2, 3, 32, 32)


def test_file_holds_only_adapter_and_head_tensors(tmp_path):
    model, path = trained(tmp_path)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    expected = {k for k in model.state_dict() if ".lora." in k or k.startswith("fc.")}
    assert keys == expected
    config = json.loads(meta["peftlite"])
    assert config["format"] == "peftlite-adapter" and config["format_version"] == 1
    assert config["peftlite_version"] == peftlite.__version__
    layer = config["layers"]["layer4.0.conv1"]
    assert layer == {"kind": "conv2d", "rank": 4, "alpha": 4.0, "dropout": 0.0, "slots": ["weight"],
                     "base_class": "Conv2d", "in_channels": 256, "out_channels": 512, "kernel_size": [3, 3],
                     "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros"}
    assert config["heads"] == {"fc": {"type": "Linear", "bias": True, "in_features": 512, "out_features": 3}}


def test_file_size_bound_and_bf16_halves(tmp_path):
    model, path = trained(tmp_path)
    with safe_open(path, "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    raw = sum(t.numel() * t.element_size() for t in tensors)
    assert os.path.getsize(path) <= raw + 4096 + 256 * len(tensors)
    half = peftlite.save(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert os.path.getsize(half) < 0.52 * os.path.getsize(path)
    fresh = peftlite.load(base(), half)
    assert fresh.layer4[0].conv1.lora.default.A.dtype == torch.float32  # adapters keep fp32 master precision
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=2e-2, atol=2e-2)


def test_load_into_fresh_base_and_into_wrapped(tmp_path):
    model, path = trained(tmp_path)
    with torch.no_grad():
        want = model(X)
    fresh = peftlite.load(base(), path)
    assert isinstance(fresh.fc, nn.Linear) and fresh.fc.out_features == 3
    with torch.no_grad():
        assert torch.equal(fresh(X), want)
    rewrapped = peftlite.wrap(base(), "layer4.*", rank=4, heads={"fc": nn.Linear(512, 3)})
    peftlite.load(rewrapped, path)
    with torch.no_grad():
        assert torch.equal(rewrapped(X), want)


def test_include_saves_a_subset_and_loads_without_disturbing_the_rest(tmp_path):
    model, _ = trained(tmp_path)
    head_file = peftlite.save(model, tmp_path / "head.safetensors", include=["fc.*"])
    with safe_open(head_file, "pt") as f:
        assert set(f.keys()) == {"fc.weight", "fc.bias"}
    other = peftlite.wrap(base(), "layer4.*", rank=4, heads={"fc": nn.Linear(512, 3)})
    lora_before = {k: v.clone() for k, v in other.state_dict().items() if ".lora." in k}
    peftlite.load(other, head_file)  # strict, but the file is marked partial
    assert torch.equal(other.fc.weight, model.fc.weight)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in lora_before.items())
    with pytest.raises(ValueError, match=r"save include: 'head\*' selected no module or tensor; patterns that"):
        peftlite.save(model, tmp_path / "x.safetensors", include=["head*"])


def test_atomic_save_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    model, path = trained(tmp_path)
    good = open(path, "rb").read()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr("peftlite.formats._safetensors.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        peftlite.save(model, path)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "plain-safetensors"])
def test_unreadable_files_raise_adapter_file_error(tmp_path, damage):
    model, path = trained(tmp_path)
    data = open(path, "rb").read()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(bad))
    target = base()
    snap = snapshot(target)
    with pytest.raises(AdapterFileError) as e:
        peftlite.load(target, bad)
    assert str(bad) in str(e.value)
    assert isinstance(e.value, ValueError)
    assert_unchanged(target, snap)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peftlite.load(base(), tmp_path / "nope.safetensors")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _, path = trained(tmp_path)
    other = peftlite.wrap(base(), "layer4.*", rank=8, heads={"fc": nn.Linear(512, 3)})
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"layer4\.0\.conv1\.lora\.default\.A has shape \(4, 2304\) in the file, "
                                         r"but the model expects \(8, 2304\)"):
        peftlite.load(other, path)
    assert_unchanged(other, snap)


def test_fresh_base_with_wrong_architecture_is_untouched(tmp_path):
    _, path = trained(tmp_path)
    torch.manual_seed(0)
    wrong = torchvision.models.resnet50(num_classes=4)  # bottlenecks: layer4.0.conv1 is a 1x1 from 1024
    snap = snapshot(wrong)
    with pytest.raises(ValueError, match=r"layer4\.0\.conv1: the file's layer geometry differs from the model's "
                                         r"\(in_channels: file 256, model 1024"):
        peftlite.load(wrong, path)
    assert_unchanged(wrong, snap)
    small = nn.Sequential()
    with pytest.raises(ValueError, match="the model has no module of that name"):
        peftlite.load(small, path)
    assert list(small.state_dict()) == [] and "_peftlite" not in small.__dict__


def test_strict_missing_and_unexpected(tmp_path):
    _, path = trained(tmp_path)
    more = peftlite.wrap(base(), ["layer4.*", "layer3.1.conv1"], rank=4, heads={"fc": nn.Linear(512, 3)})
    snap = snapshot(more)
    with pytest.raises(ValueError, match=r"tensor\(s\) missing from the file: layer3\.1\.conv1"):
        peftlite.load(more, path)
    assert_unchanged(more, snap)
    peftlite.load(more, path, strict=False)
    fewer = peftlite.wrap(base(), "layer4.1.*", rank=4, heads={"fc": nn.Linear(512, 3)})
    snap = snapshot(fewer)
    with pytest.raises(ValueError, match=r"the model has no place for: layer4\.0"):
        peftlite.load(fewer, path)
    assert_unchanged(fewer, snap)


def test_dtype_kind_mismatch_is_refused(tmp_path):
    model, path = trained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors["fc.bias"] = tensors["fc.bias"].to(torch.int32)
    bad = tmp_path / "int.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    target = base()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"fc\.bias is torch\.int32 in the file"):
        peftlite.load(target, bad)
    assert_unchanged(target, snap)


def test_load_into_merged_model_is_refused(tmp_path):
    model, path = trained(tmp_path)
    peftlite.merge(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"unmerge\(model\) first"):
        peftlite.load(model, path)
    assert_unchanged(model, snap)


def test_no_pickle_anywhere():
    import pathlib
    src = pathlib.Path(peftlite.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, f


def _fail_midway(monkeypatch):
    """Make the copy into the model fail after a few tensors have been written."""
    real = torch.Tensor.copy_
    count = [0]

    def copy_(self, src, *args, **kwargs):
        count[0] += 1
        if count[0] == 4:
            raise RuntimeError("disk went away")
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    return count


def test_a_load_that_fails_midway_leaves_a_fresh_model_as_it_was(tmp_path, monkeypatch):
    _, path = trained(tmp_path)
    fresh = base()
    snap = snapshot(fresh)
    fc = fresh.fc
    count = _fail_midway(monkeypatch)
    with pytest.raises(RuntimeError, match="disk went away"):
        peftlite.load(fresh, path)
    assert count[0] >= 4
    monkeypatch.undo()
    assert_unchanged(fresh, snap)  # no adapters, the old head back, BatchNorms unfrozen, requires_grad restored
    assert fresh.fc is fc and "_peftlite" not in fresh.__dict__


def test_a_load_that_fails_midway_leaves_a_wrapped_model_as_it_was(tmp_path, monkeypatch):
    _, path = trained(tmp_path)
    other = peftlite.wrap(base(), "layer4.*", rank=4, alpha=2.0, heads={"fc": nn.Linear(512, 3)})
    randomize_adapters(other, seed=5)
    snap = snapshot(other)
    _fail_midway(monkeypatch)
    with pytest.raises(RuntimeError, match="disk went away"):
        peftlite.load(other, path)
    monkeypatch.undo()
    assert_unchanged(other, snap)
    assert other.layer4[0].conv1.lora.default.alpha == 2.0  # the file's alpha (4.0) was not kept either


def test_saved_files_are_readable_as_any_other(tmp_path):
    import stat

    model, path = trained(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # not the temporary file's private 0600
    folder = peftlite.save(model, tmp_path / "peft_dir", format="peft")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask
