"""The one safetensors reader and writer every format uses: no pickle, atomic writes, clear read errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .schema import AdapterFileError


def file_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors as safetensors stores them: detached, on the CPU, contiguous, unaliased, floats in ``dtype``."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder(path: str, what: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: folder {folder!r} does not exist; create it first")
    return folder


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
               what: str) -> str:
    """Save ``tensors`` (as ``file_tensors`` prepares them) to a temporary file, fsync, then ``os.replace``.

    A crash never leaves a half-written file under ``path``. ``what`` names the caller in errors.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=_folder(path, what), prefix=".peftlite-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); a saved file is as any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_folder(path: str | os.PathLike, files: Mapping[str, Callable[[str], None]], what: str) -> str:
    """Write a folder of files atomically: each ``files[name](tmp_path)`` writes one into a temporary folder.

    A new folder appears by one rename; into an existing folder each file is ``os.replace``d in the given
    order (put the one that marks the folder complete last). Other files in the folder are left alone.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{what}: {path!r} is a file, but a folder is written there; give a folder path")
    tmp = tempfile.mkdtemp(dir=_folder(path, what), prefix=".peftlite-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        for name, write in files.items():
            write(os.path.join(tmp, name))
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if not os.path.exists(path):
            os.rename(tmp, path)
        else:
            for name in files:
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its metadata.

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: a folder, or not a readable safetensors file (names the path and the reason).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    if os.path.isdir(path):
        raise AdapterFileError(f"{path}: is a folder, where a .safetensors file was expected")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types, and OSError on short reads
        raise AdapterFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta
