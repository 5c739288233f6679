"""Files of named adapters: one adapter per file, loadable under any name, PEFT directories of several."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftlite
from conftest import assert_unchanged, bits_equal, snapshot
from peftlite.formats import native
from test_switching import randomize


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def two(m=None):
    m = m or base()
    peftlite.wrap(m, ["0", "2"], rank=2, alpha=4.0, name="a", heads={"4": nn.Linear(8, 5)})
    peftlite.wrap(m, ["2"], rank=3, name="b")
    return randomize(m)


X = torch.randn(4, 6)


def out(m, spec):
    peftlite.use(m, spec)
    with torch.no_grad():
        return m(X)


def test_one_named_adapter_per_file(tmp_path):
    m = two()
    with pytest.raises(ValueError, match=r"save: the model has 2 adapters \('a', 'b'\) and a file holds one; "
                                         r"pass name="):
        peftlite.save(m, tmp_path / "x.safetensors")
    with pytest.raises(KeyError, match="save: no adapter named 'z'"):
        peftlite.save(m, tmp_path / "x.safetensors", name="z")
    path = peftlite.save(m, tmp_path / "b.safetensors", name="b")
    with safe_open(path, "pt") as f:
        keys, config = set(f.keys()), json.loads(f.metadata()["peftlite"])
    assert keys == {"2.lora.b.A", "2.lora.b.B", "4.weight", "4.bias"}  # b's layers, and the shared head
    assert config["adapter"] == "b" and list(config["layers"]) == ["2"]


def test_load_under_any_name_into_fresh_and_wrapped_models(tmp_path):
    m = two()
    want_b = out(m, "b")
    path = peftlite.save(m, tmp_path / "b.safetensors", name="b")
    fresh = peftlite.load(base(), path)
    assert peftlite.adapters(fresh) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), want_b, rtol=0, atol=0)
    renamed = peftlite.load(base(), path, name="customer7")
    assert peftlite.adapters(renamed) == ["customer7"] and "customer7" in renamed[2].lora
    with torch.no_grad():
        torch.testing.assert_close(renamed(X), want_b, rtol=0, atol=0)
    other = two(base())
    peftlite.use(other, "a")
    peftlite.load(other, path, name="c")  # a new adapter: added inactive, the others untouched
    assert peftlite.adapters(other) == ["a", "b", "c"] and peftlite.switching.active(other) == {"a": 1.0}
    assert not other[2].pairs("c")["weight"].A.requires_grad
    torch.testing.assert_close(out(other, "c"), want_b, rtol=0, atol=0)


def test_loading_a_new_adapter_leaves_merged_and_active_ones_untouched(tmp_path):
    m = two()
    path = peftlite.save(m, tmp_path / "b.safetensors", name="b")
    target = two(base())
    peftlite.use(target, ["a", "b"])
    peftlite.merge(target)
    snap = snapshot(target)
    with torch.no_grad():
        merged_out = target(X)
    peftlite.load(target, path, name="c")
    now = target.state_dict()
    assert all(bits_equal(now[k], v) for k, v in snap[0].items())  # every tensor there before, to the bit
    assert all(target[i].adapter_state.merged for i in (0, 2)) and peftlite.switching.active(target) == {
        "a": 1.0, "b": 1.0}
    with torch.no_grad():
        torch.testing.assert_close(target(X), merged_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter 'b' is merged into the weights"):
        peftlite.load(target, path, name="b")
    peftlite.unmerge(target)


def test_a_failed_load_of_a_new_adapter_changes_nothing(tmp_path):
    m = two()
    path = peftlite.save(m, tmp_path / "b.safetensors", name="b")
    narrow = base()
    narrow[2] = nn.Linear(8, 8, bias=False)  # the head fits, and the file's layer 2 fits too...
    peftlite.wrap(narrow, "0", name="a", heads={"4": nn.Linear(8, 5)})
    peftlite.wrap(narrow, "2", rank=3, name="c")  # ...but the file holds 4.bias where strict keys differ
    snap = snapshot(narrow)
    bad = tmp_path / "bad.safetensors"
    tensors, config = native.read(path)
    tensors["2.lora.b.A"] = torch.zeros(3, 7)  # a shape that does not fit
    native.write(bad, tensors, config)
    with pytest.raises(ValueError, match=r"2\.lora\.d\.A has shape \(3, 7\) in the file, but the model "
                                         r"expects \(3, 8\)"):
        peftlite.load(narrow, bad, name="d")
    assert_unchanged(narrow, snap)
    assert peftlite.adapters(narrow) == ["a", "c"]


def test_peft_directories_with_several_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    theirs.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["2"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path / "dir")  # default at the top, "other" in dir/other
    assert (tmp_path / "dir" / "other" / "adapter_config.json").is_file()
    ours = peftlite.load(base(), tmp_path / "dir", name="other")
    theirs.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-6)
    peftlite.load(ours, tmp_path / "dir", name="first")  # the top-level (default) adapter, under a new name
    theirs.set_adapter("default")
    torch.testing.assert_close(out(ours, "first"), theirs(X).detach(), rtol=1e-5, atol=1e-6)
    out_dir = peftlite.save(ours, tmp_path / "back", format="peft", name="other")
    again = peft.PeftModel.from_pretrained(base(), out_dir)
    theirs.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(again(X), theirs(X), rtol=1e-5, atol=1e-6)


def test_files_of_the_same_adapter_reload_identically_after_combine_and_delete(tmp_path):
    m = two()
    peftlite.combine(m, {"a": 0.5, "b": 0.5}, name="mix", how="cat")
    want = out(m, "mix")
    path = peftlite.save(m, tmp_path / "mix.safetensors", name="mix")
    peftlite.delete(m, "mix")
    peftlite.load(m, path)
    torch.testing.assert_close(out(m, "mix"), want, rtol=0, atol=0)
    fresh = peftlite.load(copy.deepcopy(base()), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), want, rtol=0, atol=0)
