"""peftlite under torch.distributed, unchanged: DDP and FSDP2 (``fully_shard``) on CPU with gloo, 2 processes.

Each test is one spawn of two processes (a spawn costs seconds: interpreters and imports), running the
many checks its worker's docstring lists (``_distributed_workers``).
"""

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import _distributed_workers as workers  # noqa: E402  (after the skip: it imports torch.distributed)


def test_ddp_reduces_only_adapters_and_matches_single_process(tmp_path):
    reports = workers.spawn(workers.ddp_checks, tmp_path, timeout=90)
    assert reports[0]["trainable"] < reports[0]["frozen"] / 5


def test_fsdp2_trains_saves_and_loads_adapters(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 is not available")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    reports = workers.spawn(workers.fsdp_checks, tmp_path, timeout=120)
    assert reports[0]["gathers"] == reports[0]["saved_tensors"]


def test_ddp_trains_a_checkpointed_model_as_the_plain_one(tmp_path):
    reports = workers.spawn(workers.ddp_checkpointing_checks, tmp_path, timeout=90)
    assert reports[0]["checkpointed"] == reports[1]["checkpointed"] == ["layer1.0", "layer2.0", "layer3.0"]
