"""The demo, in its quick mode: every step runs, the files appear, the adapter round-trips exactly."""

import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from peftlite.demo import run as demo  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for method in demo.METHODS:
        assert method in out
    assert "reloaded outputs identical: True" in out
    assert "merged predictions identical: True" in out
    assert "unmerge restores every weight bit-exactly: True" in out
    files = set(os.listdir(tmp_path))
    assert {"base.safetensors", "curves.png", "report.md", "adapter_lora.safetensors",
            "adapter_head.safetensors", "adapter_last.safetensors", "full_finetune.safetensors"} <= files
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| LoRA on every Conv2d + head |" in report and "curves.png" in report
    sizes = {name: os.path.getsize(tmp_path / name) for name in files}
    assert sizes["adapter_head.safetensors"] < sizes["adapter_lora.safetensors"]
    assert sizes["adapter_lora.safetensors"] < sizes["full_finetune.safetensors"]


def test_demo_rejects_bad_epochs(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0", "--out", str(tmp_path)])
