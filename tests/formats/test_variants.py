"""DoRA and rsLoRA in files: peftlite round trips, format_version, and PEFT's use_dora / use_rslora in both
directions against the real peft package (equal outputs)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftlite
from peftlite import AdapterFileError
from peftlite.formats import native, schema


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))


def trained(variant="dora", rank_scaling="sqrt"):
    m = peftlite.wrap(base(), ["0", "3"], rank=2, alpha=3.0, variant=variant, rank_scaling=rank_scaling)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora." in n:
                p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)) if n.endswith("magnitude")
                        else torch.randn(p.shape, generator=g) * 0.3)
    return m


X = torch.randn(2, 3, 5, 5)


def test_round_trip_and_format_version(tmp_path):
    m = trained()
    path = peftlite.save(m, tmp_path / "d.safetensors")
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["peftlite"])
        keys = set(f.keys())
    assert config["format_version"] == 2  # an older peftlite (which reads 1) refuses it, never loads it wrong
    assert config["layers"]["0"]["variant"] == "dora" and config["layers"]["3"]["rank_scaling"] == "sqrt"
    assert {"0.lora.default.magnitude", "3.lora.default.magnitude"} <= keys
    fresh = peftlite.load(base(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), m(X), rtol=0, atol=0)
    plain = peftlite.save(peftlite.wrap(base(), "3"), tmp_path / "p.safetensors")
    assert native.read(plain)[1]["format_version"] == 1  # plain LoRA files are as before


def test_an_older_reader_refuses_a_dora_file(tmp_path, monkeypatch):
    path = peftlite.save(trained(), tmp_path / "d.safetensors")
    monkeypatch.setattr(schema, "FORMAT_VERSION", 1)  # what peftlite before DoRA reads
    with pytest.raises(AdapterFileError, match="format version 2 is newer than this peftlite reads"):
        peftlite.load(base(), path)


@pytest.mark.parametrize("variant, rank_scaling", [("dora", "linear"), ("lora", "sqrt"), ("dora", "sqrt")])
def test_peft_reads_ours_and_we_read_peft(tmp_path, variant, rank_scaling):
    peft = pytest.importorskip("peft")
    m = trained(variant, rank_scaling)
    out_dir = peftlite.save(m, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is (variant == "dora") and config["use_rslora"] is (rank_scaling == "sqrt")
    theirs = peft.PeftModel.from_pretrained(base(), out_dir).eval()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), m(X), rtol=1e-5, atol=1e-6)
    back = peftlite.load(base(), out_dir)  # and PEFT's directory back into peftlite
    layer = back[0].lora.default
    assert layer.variant == variant and layer.rank_scaling == rank_scaling
    with torch.no_grad():
        torch.testing.assert_close(back(X), m(X), rtol=1e-6, atol=1e-6)


def test_peft_made_dora_adapter_loads_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, lora_alpha=5, use_dora=True, use_rslora=True,
                                                         target_modules=["0", "3"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn(p.shape) * 0.2)
    theirs.save_pretrained(tmp_path / "dir")
    ours = peftlite.load(base(), tmp_path / "dir")
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-6)


def test_mixed_dora_and_lora_layers_are_refused_for_peft(tmp_path):
    m = peftlite.wrap(base(), "0", variant="dora")
    peftlite.wrap(m, "3")  # the same adapter name, a plain LoRA layer
    with pytest.raises(peftlite.PeftFormatError, match="DoRA and plain LoRA layers; PEFT's use_dora is one flag"):
        peftlite.save(m, tmp_path / "x", format="peft")
    again = peftlite.load(base(), peftlite.save(m, tmp_path / "x.safetensors"))  # peftlite's own format keeps both
    with torch.no_grad():
        torch.testing.assert_close(again(X), m(X), rtol=0, atol=0)


def test_rslora_mixed_with_linear_layers_folds_into_alpha_for_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = peftlite.wrap(base(), "0", rank=4, alpha=2.0, rank_scaling="sqrt")
    peftlite.wrap(m, "3", rank=4, alpha=2.0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".B"):
                p.normal_()
    out_dir = peftlite.save(m, tmp_path / "mixed", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base()), out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), m.eval()(X), rtol=1e-5, atol=1e-6)
