"""The demo, in its quick mode: every step runs, the files appear, the adapter round-trips exactly."""

import os
import sys

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


def test_demo_logs_each_method_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from peftlite.demo.digits import run_name

    logs = tmp_path / "runs"
    argv = ["--quick", "--epochs", "2", "--out", str(tmp_path / "out"), "--no-progress", "--tensorboard", str(logs)]
    assert demo.main(argv) == 0
    assert f"tensorboard --logdir {logs}" in capsys.readouterr().out
    assert sorted(os.listdir(logs)) == sorted(run_name(m) for m in demo.METHODS)  # one run per method
    for run in os.listdir(logs):
        events = EventAccumulator(str(logs / run))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {"loss/train", "accuracy/test"}
        loss, acc = events.Scalars("loss/train"), events.Scalars("accuracy/test")
        assert [e.step for e in loss] == [e.step for e in acc] == [1, 2]  # one step per epoch
        assert all(e.value > 0 for e in loss) and all(0 <= e.value <= 1 for e in acc)
    assert os.path.exists(tmp_path / "out" / "curves.png")  # in addition to the plot


def test_demo_tensorboard_without_the_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(SystemExit) as stop:
        demo.main(["--quick", "--out", str(tmp_path), "--tensorboard", str(tmp_path / "runs")])
    assert stop.value.code == 2
    assert "pip install 'peftlite[tensorboard]'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # refused before anything ran
