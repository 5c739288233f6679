"""A save killed with SIGKILL while it writes a large adapter (~128 MiB) leaves the previous one intact and
loadable. What the killed save leaves behind is one ``.peftlite-*`` folder beside it (no handler runs on
SIGKILL); it is never mistaken for the adapter: another name, and not an adapter when loaded."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import peftlite
from peftlite import AdapterFileError

CHILD = r"""
import sys, torch, peftlite
from torch import nn
torch.manual_seed(0)
model = peftlite.wrap(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), "0", rank=4,
                      heads={"1": nn.Linear(4096, 8192)})  # a 128 MiB head
peftlite.save(model, sys.argv[1], format=sys.argv[2])
print("saved", flush=True)
sys.stdin.readline()  # the parent has read the first save
with torch.no_grad():
    model[1].weight.add_(1.0)
while True:
    peftlite.save(model, sys.argv[1], format=sys.argv[2])
"""


def digest(path) -> str:
    """A hash of a file, or of a folder's files."""
    h = hashlib.sha256()
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()


def staged(folder) -> int:
    """Bytes written so far into a save's temporary ``.peftlite-*`` folder (0 when there is none)."""
    total = 0
    for name in os.listdir(folder):
        if name.startswith(".peftlite-"):
            try:
                for entry in os.scandir(os.path.join(folder, name)):
                    total += entry.stat().st_size
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
    return total


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("format", ["peftlite", "peft"])
def test_a_save_killed_midway_leaves_the_previous_adapter(tmp_path, format):
    path = tmp_path / ("adapter.safetensors" if format == "peftlite" else "adapter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # a save that finishes between the last look and the kill is tried again
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), format], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "saved"
            before = digest(path)
            child.stdin.write("go\n")
            child.stdin.flush()
            deadline = time.monotonic() + 60
            while staged(tmp_path) == 0:  # until the second save has written something
                assert time.monotonic() < deadline, "the second save never started writing"
                time.sleep(0.0005)
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if digest(path) == before:
            break
    else:
        pytest.fail("three saves finished before the kill landed")
    assert child.returncode == -signal.SIGKILL
    torch.manual_seed(0)
    nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    first = nn.Linear(4096, 8192).weight  # the first save's head, as the child drew it
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(4096, 8192) if format == "peft" else nn.Linear(64, 2))
    model = peftlite.load(fresh, path)
    assert torch.equal(model[1].weight, first)  # the first save's values, not the second's
    left = [n for n in os.listdir(tmp_path) if n != path.name]
    assert len(left) == 1 and left[0].startswith(".peftlite-") and os.path.isdir(tmp_path / left[0]), left
    with pytest.raises(AdapterFileError, match="a folder without adapter_config.json"):
        peftlite.load(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)), tmp_path / left[0])
