"""The TensorBoard helper: a writer that logs, or an ImportError naming the extra to install."""

import sys

import pytest

from peftlite.integrations import tensorboard


def test_without_tensorboard_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert not tensorboard.available()
    with pytest.raises(ImportError, match=r"pip install 'peftlite\[tensorboard\]'"):
        tensorboard.summary_writer(tmp_path)


def test_the_writer_writes_scalars_that_tensorboard_reads(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert tensorboard.available()
    with tensorboard.summary_writer(tmp_path / "run") as writer:
        for step in (1, 2, 3):
            writer.add_scalar("loss/train", 1.0 / step, step)
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss/train")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
