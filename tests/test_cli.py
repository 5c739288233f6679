"""The peftlite command, run in-process through main([...]) and once as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from peftlite.cli import main
from peftlite.demo.digits import tiny_resnet

X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def files(tmp_path):
    """Base weights of a tiny ResNet, and an adapter: LoRA on layer3's convs (rank 4), a new 7-class head."""
    torch.manual_seed(0)
    base = tiny_resnet()
    save_file(dict(base.state_dict()), tmp_path / "base.safetensors")
    model = peftlite.wrap(base, "layer3.*", rank=4, alpha=8, heads={"fc": nn.Linear(64, 7)})
    randomise(model).eval()
    peftlite.save(model, tmp_path / "a.safetensors")
    return tmp_path, model


def fresh_base(tmp_path):
    model = tiny_resnet()
    model.load_state_dict(load_file(tmp_path / "base.safetensors"))
    return model.eval()


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_text(files, capsys):
    tmp_path, model = files
    rc, out, err = run(capsys, "inspect", tmp_path / "a.safetensors")
    assert rc == 0 and err == ""
    assert "peftlite adapter" in out
    assert "layer3.0.conv1" in out and "conv2d" in out and "4x288" in out  # A: (r, in*kh*kw) = (4, 32*9)
    assert "head fc (Linear): bias 7, weight 7x64" in out
    assert "float32" in out and "config:" in out


def test_inspect_json(files, capsys):
    tmp_path, model = files
    rc, out, _ = run(capsys, "inspect", tmp_path / "a.safetensors", "--json")
    d = json.loads(out)
    tensors = load_file(tmp_path / "a.safetensors")
    assert d["format"] == "peftlite" and d["tensors"] == len(tensors)
    assert d["params"] == sum(t.numel() for t in tensors.values())
    assert d["bytes"] == 4 * d["params"] and d["file_bytes"] == os.path.getsize(tmp_path / "a.safetensors")
    names = [layer["name"] for layer in d["layers"]]
    assert names == [n for n, m in model.named_modules() if isinstance(m, peftlite.layers.AdaptedLayer)]
    conv = d["layers"][0]
    assert conv["rank"] == 4 and conv["scale"] == 2.0 and conv["geometry"]["kernel_size"] == [3, 3]
    assert d["modules"]["fc"]["params"] == 7 * 64 + 7


def test_convert_round_trip(files, capsys):
    tmp_path, model = files
    with torch.no_grad():
        want = model(X)
    rc, out, _ = run(capsys, "convert", tmp_path / "a.safetensors", tmp_path / "peft_dir", "--to", "peft")
    assert rc == 0, out
    rc, out, _ = run(capsys, "inspect", tmp_path / "peft_dir", "--json")
    assert rc == 0 and json.loads(out)["format"] == "peft"
    rc, _, _ = run(capsys, "convert", tmp_path / "peft_dir", tmp_path / "back.safetensors",
                   "--to", "peftlite")
    assert rc == 0
    for path in ("peft_dir", "back.safetensors"):
        base = fresh_base(tmp_path)
        base.fc = nn.Linear(64, 7)  # PEFT's modules_to_save: the base model must have the head's shape
        with torch.no_grad():
            torch.testing.assert_close(peftlite.load(base, tmp_path / path)(X), want, rtol=1e-6, atol=1e-6)


def test_convert_peft_dir_loads_in_peft(files, capsys):
    peft = pytest.importorskip("peft")
    tmp_path, model = files
    assert run(capsys, "convert", tmp_path / "a.safetensors", tmp_path / "p", "--to", "peft")[0] == 0
    base = fresh_base(tmp_path)
    base.fc = nn.Linear(64, 7)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), model(X), rtol=1e-5, atol=1e-6)


def test_merge_module_callable(files, capsys):
    tmp_path, model = files
    rc, out, err = run(capsys, "merge", "--model", "peftlite.demo.digits:tiny_resnet", "--weights",
                       tmp_path / "base.safetensors", "--adapter", tmp_path / "a.safetensors",
                       "--out", tmp_path / "merged.safetensors")
    assert rc == 0, err
    merged = tiny_resnet(num_classes=7)
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"))  # strict: plain keys, head included
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(X), model(X), rtol=1e-5, atol=1e-5)


def test_merge_torchvision(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    save_file(dict(base.state_dict()), tmp_path / "base.safetensors")
    peftlite.wrap(base, "layer4.*", rank=2)
    randomise(base).eval()
    peftlite.save(base, tmp_path / "a.safetensors")
    x = torch.randn(1, 3, 32, 32)
    rc, _, err = run(capsys, "merge", "--model", "torchvision:resnet18", "--weights",
                     tmp_path / "base.safetensors", "--adapter", tmp_path / "a.safetensors",
                     "--out", tmp_path / "m.safetensors")
    assert rc == 2 and "num_classes" in err  # the base was built with 10 classes
    rc, _, err = run(capsys, "merge", "--model", "torchvision:resnet18", "--kw", "num_classes=10",
                     "--weights", tmp_path / "base.safetensors", "--adapter", tmp_path / "a.safetensors",
                     "--out", tmp_path / "m.safetensors")
    assert rc == 0, err
    merged = torchvision.models.resnet18(num_classes=10)
    merged.load_state_dict(load_file(tmp_path / "m.safetensors"))
    with torch.no_grad():
        want = base(x)
        torch.testing.assert_close(merged.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


MERGE = ["merge", "--weights", "{tmp}/base.safetensors", "--adapter", "{tmp}/a.safetensors",
         "--out", "{tmp}/m.safetensors"]
TINY = ["--model", "peftlite.demo.digits:tiny_resnet"]


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{tmp}/missing.safetensors"], "does not exist"),
    (["inspect", "{tmp}/junk.safetensors"], "not a readable safetensors file"),
    (["inspect", "{tmp}/plain.safetensors"], "without peftlite metadata"),
    (["inspect", "{tmp}"], "not a PEFT adapter directory"),
    (["convert", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--to", "peftlite"], "already in peftlite"),
    (["convert", "{tmp}/a.safetensors", "{tmp}/nowhere/x", "--to", "peft"], "does not exist"),
    (MERGE + ["--model", "nonsense"], "expected torchvision:NAME or module:callable"),
    (MERGE + ["--model", "torchvision:nonet"], "no model 'nonet'"),
    (MERGE + ["--model", "no_such_module:f"], "cannot import"),
    (MERGE[:2] + ["{tmp}/missing.safetensors"] + MERGE[3:] + TINY, "does not exist"),
    (MERGE + TINY + ["--kw", "width=8"], "does not fit"),
    (MERGE + TINY + ["--kw", "oops"], "NAME=VALUE"),
])
def test_errors_are_one_line_exit_2(files, capsys, argv, words):
    tmp_path, _ = files
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2
    assert err.startswith("peftlite: error: ") and err.count("\n") == 1, err
    assert words in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_subprocess_smoke(files):
    tmp_path, _ = files
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ok = subprocess.run([sys.executable, "-m", "peftlite", "inspect", str(tmp_path / "a.safetensors")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "layer3.0.conv1" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "peftlite", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
