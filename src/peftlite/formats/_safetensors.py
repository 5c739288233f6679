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
    """Tensors as safetensors stores them: detached, on the CPU, contiguous, unaliased, floats in ``dtype``.

    A sharded tensor (a ``DTensor``, as FSDP2's ``fully_shard`` leaves parameters) is gathered whole with
    ``full_tensor()``: a collective, so every rank of its mesh must call this with the same keys in the
    same order (``peftlite.save`` on every rank). Only the tensors given are gathered.
    """
    dtensor = getattr(torch.distributed, "tensor", None)  # there once imported: a DTensor exists only then
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if dtensor is not None and isinstance(t, dtensor.DTensor):
            t = t.full_tensor()  # (shape,) on every rank
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


def _sync_folder(folder: str) -> None:
    """fsync a folder, so that a rename in it survives a power loss (where the OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
               what: str) -> str:
    """Save ``tensors`` (as ``file_tensors`` prepares them) into a temporary folder, fsync, then ``os.replace``.

    A crash never leaves a half-written file under ``path``. The file is written inside a private
    ``.peftlite-*`` folder beside ``path`` because safetensors (0.8+) writes through a temporary file of
    its own, a full-size ``.tmpXXXXXX`` that a killed process leaves behind looking like a valid file;
    in there, a killed save leaves one ``.peftlite-*`` folder and nothing else. ``what`` names the caller.
    """
    path = os.fspath(path)
    folder = _folder(path, what)
    tmp = tempfile.mkdtemp(dir=folder, prefix=".peftlite-")
    staged = os.path.join(tmp, os.path.basename(path))
    try:
        save_file(dict(tensors), staged, metadata=metadata)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(staged, 0o666 & ~_umask())  # a saved file is as any other (safetensors' own may be 0600)
        os.replace(staged, path)
        _sync_folder(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
        _sync_folder(os.path.dirname(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# safetensors' dtype names (as its header spells them) -> torch dtypes; a file with another is refused
_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("I64", "int64"), ("I32", "int32"),
    ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool")) if hasattr(torch, attr)}


def _safe_open(path: str):
    """safetensors' reader; with ``backend="pread"`` (safetensors 0.8+) each tensor is read into its own
    buffer, freed when the tensor is, instead of being a view of a private mmap of the whole file."""
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # an older safetensors: no backend argument
        return safe_open(path, framework="pt", device="cpu")


class TensorFile(Mapping):
    """A safetensors file opened to be read one tensor at a time: ``file[key]`` reads one tensor.

    Opening reads the header only. safetensors checks it before any tensor exists: the declared offsets
    must tile the data section exactly, each tensor's byte size must equal its shape times its dtype, and
    the data section must end at the end of the file; so a header that declares more than the file holds
    (a 1 TB tensor in a 1 kB file) fails here, having allocated nothing. ``specs`` describes every tensor
    as a meta tensor (shape and dtype, no data); ``metadata`` is the header's string map.

    Raises (opening):
        FileNotFoundError: no such file. PermissionError (an OSError too): not allowed to read it.
        AdapterFileError: a folder or another non-regular file, or not a readable safetensors file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"adapter file {path!r} does not exist")
        if os.path.isdir(path):
            raise AdapterFileError(f"{path}: is a folder, where a .safetensors file was expected")
        if not os.path.isfile(path):  # a FIFO would block the open, a device has no end
            raise AdapterFileError(f"{path}: is not a regular file, where a .safetensors file was expected")
        with open(path, "rb"):  # safetensors reports every failure to open as "No such file"
            pass
        self._file = None
        try:
            self._file = _safe_open(path)
            self.metadata: dict[str, str] = self._file.metadata() or {}
            self.specs: dict[str, torch.Tensor] = {}
            for key in self._file.keys():
                info = self._file.get_slice(key)
                dtype = _DTYPES.get(info.get_dtype())
                if dtype is None:
                    raise AdapterFileError(f"{path}: tensor {key!r} has dtype {info.get_dtype()}, which peftlite "
                                           f"does not read (it reads {', '.join(_DTYPES)})")
                self.specs[key] = torch.empty(info.get_shape(), dtype=dtype, device="meta")
        except AdapterFileError:
            self.close()
            raise
        except Exception as e:  # safetensors raises its own error types, and OSError on short reads
            self.close()
            raise AdapterFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.specs:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as e:  # the file changed or shrank since it was opened, an I/O error
            raise AdapterFileError(f"{self.path}: tensor {key!r} could not be read ({type(e).__name__}: {e})") from None

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its metadata; ``TensorFile`` reads one at a time.

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: a folder, or not a readable safetensors file (names the path and the reason).
    """
    with TensorFile(path) as f:
        return {k: f[k] for k in f}, f.metadata
