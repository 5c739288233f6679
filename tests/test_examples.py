"""The examples that run offline in seconds, run as scripts (in this process, so imports are shared)."""

from __future__ import annotations

import runpy
import tempfile
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def one_thread():
    """Tiny tensors, where intra-op threads only add synchronisation (much slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unet_loha_loads_a_lycoris_file_merges_and_unmerges_bit_exactly(capsys, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("lycoris")
    pytest.importorskip("diffusers")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's LyCORIS file goes here
    runpy.run_path(str(EXAMPLES / "unet_loha.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert list(tmp_path.glob("*/unet_loha.safetensors"))
    assert "all 208 base tensors bit-exact (torch.equal): True" in out and out.rstrip().endswith("ok")


def test_pissa_example_shares_a_plain_lora_and_restores_the_base(capsys, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's adapter file goes here
    monkeypatch.setattr("sys.argv", ["06_pissa.py"])
    runpy.run_path(str(EXAMPLES / "06_pissa.py"), run_name="__main__")
    out = capsys.readouterr().out
    gap = float(out.split("max |Δ output|: ")[1].split()[0])
    assert gap < 1e-4 and "original weights back bit for bit: True" in out
