"""The peftlite command, run in-process through main([...]), and every documented line as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from peftlite.cli import describe_file, format_description, main, read_for_inspect
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


@pytest.mark.parametrize("rank_scaling, variant", [("sqrt", "lora"), ("linear", "dora"), ("sqrt", "dora")])
def test_inspect_json_reports_the_scale_the_adapter_computes_with(tmp_path, capsys, rank_scaling, variant):
    """rsLoRA (rank 4, alpha 8) computes with 8 / sqrt(4) = 4, not alpha / rank = 2: inspect reports what the
    loaded model's pairs use."""
    torch.manual_seed(0)
    model = peftlite.wrap(tiny_resnet(), "layer3.*", rank=4, alpha=8, rank_scaling=rank_scaling, variant=variant)
    peftlite.save(model, tmp_path / "r.safetensors")
    rc, out, _ = run(capsys, "inspect", tmp_path / "r.safetensors", "--json")
    layer = json.loads(out)["layers"][0]
    expected = 8 / (4 ** 0.5 if rank_scaling == "sqrt" else 4)
    assert rc == 0 and layer["scale"] == expected == model.get_submodule(layer["name"]).lora["default"].scale
    assert (layer["rank_scaling"], layer["variant"]) == (rank_scaling, variant)
    assert "rank_scaling" not in layer["geometry"] and "variant" not in layer["geometry"]


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


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLITE_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["inspect", tmp_path / "missing.safetensors"])


def test_demo_usage_as_documented(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert all(f in out for f in ("[--quick]", "[--out DIR]", "[--epochs N]", "[--seed S]"))
    assert "adapt it to 5-9 four ways" in out  # the demo's own description


def test_broken_pipe_is_quiet(files, capsys, monkeypatch):
    """``peftlite inspect a.safetensors --json | head -1``: the reader leaves; no error, exit 141 as if
    killed by SIGPIPE, and stdout is pointed at /dev/null so that the interpreter's last flush is quiet."""
    tmp_path, _ = files
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = open(write_end, "w")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["inspect", tmp_path / "a.safetensors", "--json"]) == 141
    stdout.close()  # would raise BrokenPipeError on the data still buffered, were it still the pipe
    assert capsys.readouterr().err == ""


# ---- every documented command line, through the installed console script ----------------------------
#
# Each runs in its own folder under one tmp dir, all at once (each start-up imports torch: seconds), with
# the file names the docs use. The check of each waits for its process.

ROOT = Path(__file__).resolve().parent.parent
PEFTLITE = shutil.which("peftlite", path=os.path.dirname(sys.executable))
HAS_DEMO_EXTRA = all(importlib.util.find_spec(m) for m in ("sklearn", "matplotlib", "tqdm"))
M18 = "merge --model torchvision:resnet18 --weights base.safetensors --adapter a.safetensors --out merged.safetensors"
RUNS = {  # name: the command line, run in tmp/name/
    "demo": "peftlite demo --quick --out DIR --epochs 1 --seed 1 --no-progress --tensorboard TB",
    "merge": f"peftlite {M18}",
    "merge --kw": f"peftlite {M18} --kw num_classes=10",  # the guide's "pass them again: --kw ..."
    "inspect": "peftlite inspect adapter.safetensors",
    "inspect --json": "peftlite inspect peft_dir --json",
    "to peft": "peftlite convert adapter.safetensors out_dir --to peft",
    "to peftlite": "peftlite convert peft_dir adapter.safetensors --to peftlite",
    "bad path": "peftlite inspect missing.safetensors",
    "python -m": "python -m peftlite --help",
}
DOCUMENTED = {  # each command line of README.md's "Command line" and docs/guide.md's: the runs that do it
    "peftlite inspect adapter.safetensors [--json]": ("inspect", "inspect --json"),
    "peftlite inspect adapter.safetensors": ("inspect",),
    "peftlite inspect peft_dir --json": ("inspect --json",),
    "peftlite convert adapter.safetensors out_dir --to peft": ("to peft",),
    "peftlite convert adapter.safetensors peft_dir --to peft": ("to peft",),
    "peftlite convert peft_dir adapter.safetensors --to peftlite": ("to peftlite",),
    f"peftlite {M18}": ("merge",),
    f"peftlite {M18.replace('a.safetensors', 'adapter.safetensors')}": ("merge",),
    "peftlite demo [--quick] [--out DIR] [--epochs N] [--seed S] [--tensorboard DIR]": ("demo",),
}


def documented_lines(path: Path, heading: str) -> set[str]:
    """The ``peftlite ...`` lines of the bash blocks in one section (continuations joined, comments cut)."""
    section = path.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = set()
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#", 1)[0].split())
            if line.startswith("peftlite "):
                lines.add(line)
    return lines


def test_every_documented_line_is_run():
    found = documented_lines(ROOT / "README.md", "Command line") | documented_lines(
        ROOT / "docs" / "guide.md", "The command line")
    assert found == set(DOCUMENTED)
    assert {run for runs in DOCUMENTED.values() for run in runs} <= set(RUNS)


def state_equal(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class Runs:
    """The processes of RUNS, started together; ``result(name)`` waits for one. ``expected``: what the
    tests compare their output files with."""

    def __init__(self, root: Path, expected: dict):
        self.root, self.expected, self.procs, self.results = root, expected, {}, {}
        env = {k: v for k, v in os.environ.items() if k != "PEFTLITE_DEBUG"}
        env["OMP_NUM_THREADS"] = "1"  # nine processes share the cores
        for name, line in RUNS.items():
            if name == "demo" and not HAS_DEMO_EXTRA:
                continue
            argv = shlex.split(line)
            argv[0] = sys.executable if argv[0] == "python" else PEFTLITE
            folder = self.folder(name)
            with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
                self.procs[name] = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=err)

    def folder(self, name: str) -> Path:
        return self.root / name.replace(" ", "_")

    def result(self, name: str) -> tuple[int, str, str]:
        if name not in self.results:
            proc = self.procs[name]
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            folder = self.folder(name)
            self.results[name] = proc.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text()
        return self.results[name]

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The input files of every run, made here, then every run started."""
    if PEFTLITE is None:
        pytest.skip(f"no peftlite console script beside {sys.executable}")
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path_factory.mktemp("cli")
    for name in RUNS:
        (root / name.replace(" ", "_")).mkdir()
    expected = {}
    # a tiny ResNet with LoRA on layer3 and a new 7-class head: a peftlite file and a PEFT directory
    torch.manual_seed(0)
    tiny = tiny_resnet()
    expected["tiny base"] = {k: v.clone() for k, v in tiny.state_dict().items()}
    randomise(peftlite.wrap(tiny, "layer3.*", rank=4, alpha=8, heads={"fc": nn.Linear(64, 7)})).eval()
    adapter = peftlite.save(tiny, root / "inspect" / "adapter.safetensors")
    shutil.copy(adapter, root / "to_peft")
    for name in ("inspect --json", "to peftlite"):
        peftlite.save(tiny, root / name.replace(" ", "_") / "peft_dir", format="peft")
    with torch.no_grad():
        expected["tiny"] = tiny(X)
    # torchvision's resnet18 as built by default and with --kw num_classes=10, LoRA on layer4's convs
    for name, kwargs in (("merge", {}), ("merge --kw", {"num_classes": 10})):
        folder = root / name.replace(" ", "_")
        model = torchvision.models.resnet18(**kwargs)
        save_file(dict(model.state_dict()), folder / "base.safetensors")
        peftlite.save(randomise(peftlite.wrap(model, "layer4.*.conv*", rank=2)), folder / "a.safetensors")
        peftlite.unwrap(model, merge=True)  # peftlite's own merge, which the command's must equal
        expected[name] = {k: v.clone() for k, v in model.state_dict().items()}
    started = Runs(root, expected)
    yield started
    started.stop()


def ok(runs: Runs, name: str) -> tuple[str, Path]:
    rc, out, err = runs.result(name)
    assert rc == 0, f"{RUNS[name]!r} exited {rc}:\n{err}"
    return out, runs.folder(name)


def test_line_inspect(runs, monkeypatch):
    out, folder = ok(runs, "inspect")
    monkeypatch.chdir(folder)
    assert out == format_description(describe_file("adapter.safetensors")) + "\n"
    assert out.startswith("adapter.safetensors: peftlite adapter\n") and "layer3.0.conv1" in out


def test_line_inspect_json(runs, monkeypatch):
    out, folder = ok(runs, "inspect --json")
    monkeypatch.chdir(folder)
    assert json.loads(out) == json.loads(json.dumps(describe_file("peft_dir")))
    assert json.loads(out)["format"] == "peft"


def test_line_convert_to_peft(runs):
    _, folder = ok(runs, "to peft")
    assert sorted(os.listdir(folder / "out_dir")) == ["adapter_config.json", "adapter_model.safetensors"]
    fmt, back, config, _ = read_for_inspect(str(folder / "out_dir"))  # converted back, in-process
    original, original_config = peftlite.formats.native.read(folder / "adapter.safetensors")
    assert fmt == "peft" and state_equal(back, original)
    assert config["layers"].keys() == original_config["layers"].keys()


def test_line_convert_to_peftlite(runs):
    _, folder = ok(runs, "to peftlite")
    written, _ = peftlite.formats.native.read(folder / "adapter.safetensors")
    assert state_equal(written, read_for_inspect(str(folder / "peft_dir"))[1])
    model = tiny_resnet()
    model.load_state_dict(runs.expected["tiny base"])
    model.fc = nn.Linear(64, 7)  # PEFT's modules_to_save: the head's shape comes from the base model
    with torch.no_grad():
        got = peftlite.load(model, folder / "adapter.safetensors").eval()(X)
    torch.testing.assert_close(got, runs.expected["tiny"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["merge", "merge --kw"])
def test_line_merge(runs, name):
    out, folder = ok(runs, name)
    assert out.startswith("wrote merged.safetensors: torchvision:resnet18 with a.safetensors merged")
    merged = load_file(folder / "merged.safetensors")
    assert state_equal(merged, runs.expected[name])  # bit for bit: the same merge as peftlite.unwrap's


def test_line_demo(runs):
    if not HAS_DEMO_EXTRA:
        for module in ("sklearn", "matplotlib", "tqdm"):
            pytest.importorskip(module)
    out, folder = ok(runs, "demo")
    assert "unmerge restores every weight bit-exactly: True" in out
    report = (folder / "DIR" / "report.md").read_text()
    assert "(1 epochs each, seed 1, quick mode)" in report  # --epochs, --seed and --quick were read
    assert (folder / "DIR" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([p for p in (folder / "TB").rglob("events.out.tfevents.*")]) == 4  # one run per method


def test_line_bad_path(runs):
    rc, out, err = runs.result("bad path")
    assert rc == 2 and out == ""
    assert err.startswith("peftlite: error: ") and err.count("\n") == 1 and "does not exist" in err, err


def test_line_python_m(runs):
    out, _ = ok(runs, "python -m")
    assert out.startswith("usage: peftlite ") and all(c in out for c in ("inspect", "merge", "convert", "demo"))


class Tied(nn.Module):
    """An output Linear tied to an embedding, as transformers ties them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_merge_refuses_a_tied_weight_unless_untie(tmp_path, capsys):
    torch.manual_seed(0)
    base = Tied()
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "out.weight"}, str(weights))
    wrapped = peftlite.wrap(Tied(), "out", rank=2)
    with torch.no_grad():
        wrapped.out.lora.default.B.normal_()
    adapter = peftlite.save(wrapped, tmp_path / "a.safetensors")
    argv = ["merge", "--model", "test_cli:Tied", "--weights", weights, "--adapter", adapter, "--out",
            tmp_path / "m.safetensors"]
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and "shared with emb.weight" in err and "untie=True" in err
    rc, out, err = run(capsys, *argv, "--untie")
    assert rc == 0, err
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(merged["emb.weight"], base.emb.weight)  # the embedding keeps W
    assert not torch.equal(merged["out.weight"], base.emb.weight)  # the head has its merged copy
