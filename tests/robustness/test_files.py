"""Damaged and hostile adapter files: truncated, bit-flipped, hand-made headers and configs, not safetensors
at all, PEFT directories with a broken adapter_config.json, NaN and Inf values.

Every one is refused with a ValueError (AdapterFileError, PeftFormatError) that names the file and what is
wrong, the model is left bit-identical (tensors, module classes, requires_grad), and nothing is allocated
that the file does not hold. What no reader can detect (a flipped bit that leaves a valid file) is
checked to be only that.
"""

import json
import math
import os
import pickle
import random
import re
import struct
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

import peftlite
from conftest import assert_unchanged, bits_equal, randomize_adapters, snapshot
from peftlite import AdapterFileError, PeftFormatError
from peftlite.formats import _safetensors


class Net(nn.Module):
    """Conv and Linear layers, a trainable LayerNorm and a head; ``out`` sorts after ``norm`` in a file."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.out = nn.Linear(4, 4)
        self.cls = nn.Linear(4, 2)


LAYERS = ["conv", "fc1", "fc2", "out"]


def base() -> Net:
    torch.manual_seed(0)
    return Net()


def adapted(seed: int = 0, name: str = "default") -> Net:
    model = peftlite.wrap(base(), LAYERS, rank=2, heads={"cls": nn.Linear(4, 3)}, trainable="norm", name=name)
    randomize_adapters(model, seed=seed)
    with torch.no_grad():
        model.norm.weight.add_(0.5 + seed)  # the trainable module's values differ from a fresh model's
    return model


def targets() -> dict[str, nn.Module]:
    """One model per load path: a fresh base (wrapped by load), the same adapter (values), another (new)."""
    return {"fresh": base(), "values": adapted(seed=7), "new": adapted(seed=7, name="other")}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid adapter file (its bytes, and the source model's state)."""
    model = adapted()
    path = peftlite.save(model, tmp_path_factory.mktemp("good") / "adapter.safetensors")
    return open(path, "rb").read(), model.state_dict()


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def config_of(header: dict) -> dict:
    return json.loads(header["__metadata__"]["peftlite"])


def with_config(data: bytes, config_text: str) -> bytes:
    header, body = split(data)
    header["__metadata__"]["peftlite"] = config_text
    return join(header, body)


def flipped(data: bytes, at: tuple[int, int], path):
    """``data`` with bit ``at[1]`` of byte ``at[0]`` flipped, written to ``path``: -> (the bytes, path)."""
    out = bytearray(data)
    out[at[0]] ^= 1 << at[1]
    path.write_bytes(bytes(out))
    return bytes(out), path


def refused(path, models: dict[str, nn.Module], what: str | None = None, error=ValueError) -> list[str]:
    """Load ``path`` into every model: each must raise ``error`` naming the file (and ``what``), and stay as it was."""
    messages = []
    for label, model in models.items():
        snap = snapshot(model)
        modules = dict(model.named_modules())
        with pytest.raises(error) as e:
            peftlite.load(model, path)
        message = str(e.value)
        assert str(path) in message, f"{label}: the error does not name the file: {message}"
        if what is not None:
            assert re.search(what, message), f"{label}: {message!r} does not say {what!r}"
        assert_unchanged(model, snap)
        assert all(model.get_submodule(n) is m for n, m in modules.items()), f"{label}: a module was replaced"
        messages.append(message)
    return messages


def test_the_undamaged_file_loads_on_every_path(tmp_path, good):
    data, state = good
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    for label, model in targets().items():  # "new" gains the file's adapter, "default", beside "other"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "new": the shared trainable norm changes, and load says so
            peftlite.load(model, path)
        now = model.state_dict()
        for k, v in state.items():
            assert bits_equal(now[k], v), (label, k)


def test_truncated_at_50_offsets(tmp_path, good):
    data, _ = good
    models = targets()
    for cut in sorted(random.Random(0).sample(range(len(data)), 50)):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        refused(path, models, "not a readable safetensors file", AdapterFileError)


# Config fields that a flipped bit can change into another valid value, or drop (a renamed key) where a default
# stands in: no reader can tell. alpha, dropout and rank_scaling change what the adapter computes; the others
# are not read by load (a dropped "slots" defaults to the model's own, which it must equal).
SILENT = {"alpha", "dropout", "rank_scaling", "slots", "peftlite_version", "base_class", "trainable", "format"}


def _changes(a, b, where=()):
    """Leaf paths where two JSON values differ (a key renamed: the old key's path; the new one is unknown)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a for p in (_changes(a[k], b[k], where + (k,)) if k in b else [where + (k,)])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _changes(x, y, where + (i,))]
    return [] if a == b else [where]


def test_bit_flips_in_the_header(tmp_path, good):
    """Every flip is refused, or leaves a valid file whose tensors are untouched and whose config differs only
    in a value no reader can check (an alpha, a dropout, a version string)."""
    data, _ = good
    header, _ = split(data)
    end = 8 + struct.unpack("<Q", data[:8])[0]
    models = targets()
    rnd = random.Random(1)
    silent = []
    for i in range(50):
        pos = rnd.randrange(end)
        damaged, path = flipped(data, (pos, rnd.randrange(8)), tmp_path / f"flip{i}.safetensors")
        fresh = base()
        try:
            peftlite.load(fresh, path)
        except ValueError as e:
            assert str(path) in str(e)
            refused(path, models)
            continue
        new_header, _ = split(damaged)
        meta, new_meta = header["__metadata__"], new_header["__metadata__"]
        assert {k: v for k, v in new_header.items() if k != "__metadata__"} == \
               {k: v for k, v in header.items() if k != "__metadata__"}, "a changed tensor entry was loaded"
        paths = _changes(config_of(header), config_of(new_header)) + \
            [("__metadata__", k) for k in meta if k != "peftlite" and meta[k] != new_meta.get(k)]
        assert paths and all(set(p) & SILENT for p in paths), f"flip at {pos} changed {paths} unnoticed"
        silent.append(paths)
    print(f"{len(silent)} of 50 header flips left a valid file: {silent}")
    assert len(silent) < 10  # most flips break the JSON, a shape, an offset or a name


def test_bit_flips_in_the_data(tmp_path, good):
    """Undetectable by design (safetensors has no checksum): a flip changes one value, or makes an adapter
    value NaN/Inf, which is refused."""
    data, state = good
    start = 8 + struct.unpack("<Q", data[:8])[0]
    rnd = random.Random(2)
    for i in range(20):
        pos = rnd.randrange(start, len(data))
        _, path = flipped(data, (pos, rnd.randrange(8)), tmp_path / f"data{i}.safetensors")
        model = base()
        try:
            peftlite.load(model, path)
        except AdapterFileError as e:
            assert re.search(r"holds 1 non-finite value\(s\)", str(e))
            refused(path, targets(), "non-finite")
            continue
        differ = sum(int((now.view(torch.uint8) != state[k].view(torch.uint8)).sum())
                     for k, now in model.state_dict().items())
        assert differ == 1  # one byte of one tensor


def _last(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _second(header: dict) -> str:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return keys[1]


A = "fc1.lora.default.A"  # (2, 4) float32: 32 bytes


def _set(key, field, value):
    def edit(header, body):
        header[key][field] = value
        return join(header, body)
    return edit


def _offsets(pick, change):
    def edit(header, body):
        key = pick(header)
        s, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = change(s, e, len(body))
        return join(header, body)
    return edit


def _terabyte(header, body):
    header["huge"] = {"dtype": "F32", "shape": [2 ** 38], "data_offsets": [len(body), len(body) + 2 ** 40]}
    return join(header, body)


def _raw_header(text: bytes):
    return lambda header, body: struct.pack("<Q", len(text)) + text + body


def _metadata_bytes(old: bytes, new: bytes):
    def edit(header, body):
        data = join(header, body)
        n = struct.unpack("<Q", data[:8])[0]
        raw = data[8:8 + n].replace(old, new, 1)
        return struct.pack("<Q", len(raw)) + raw + body
    return edit


HEADERS = {
    "float as int32 (same bytes)": (_set(A, "dtype", "I32"), r"fc1\.lora\.default\.A is torch\.int32 in the file"),
    "float16 for float32 bytes": (_set(A, "dtype", "F16"), "not a readable safetensors file"),
    "unknown dtype": (_set(A, "dtype", "F99"), "not a readable safetensors file"),
    "dtype peftlite does not read": (lambda h, b: (h[A].update(dtype="U16", shape=[2, 8]), join(h, b))[1],
                                     r"dtype U16, which peftlite does not read"),
    "float64, half the elements": (lambda h, b: (h[A].update(dtype="F64", shape=[2, 2]), join(h, b))[1],
                                   r"fc1\.lora\.default\.A has shape \(2, 2\) in the file, but the model expects "
                                   r"\(2, 4\)"),
    "A transposed": (_set(A, "shape", [4, 2]), r"fc1\.lora\.default\.A has shape \(4, 2\), but its layer 'fc1' has "
                                               r"rank 2"),
    "A flattened": (_set(A, "shape", [8]), r"has shape \(8,\), but its layer 'fc1' has rank 2"),
    "head transposed": (_set("cls.weight", "shape", [4, 3]), r"cls\.weight has shape \(4, 3\) in the file"),
    "negative dimension": (_set(A, "shape", [-2, 4]), "not a readable safetensors file"),
    "overflowing shape": (_set(A, "shape", [2 ** 40, 2 ** 40, 2 ** 40]), "not a readable safetensors file"),
    "overlapping offsets": (_offsets(_second, lambda s, e, n: [s - 4, e - 4]), "invalid offset"),
    "offsets out of range": (_offsets(_last, lambda s, e, n: [s, e + 4]), "not a readable safetensors file"),
    "offsets reversed": (_offsets(_first, lambda s, e, n: [e, s]), "not a readable safetensors file"),
    "a gap": (_offsets(_second, lambda s, e, n: [s + 4, e + 4]), "not a readable safetensors file"),
    "a 1 TB tensor": (_terabyte, "incomplete metadata"),
    "header length of 1 TB": (lambda h, b: struct.pack("<Q", 2 ** 40) + join(h, b)[8:], "too large"),
    "header length past the end": (lambda h, b: struct.pack("<Q", len(join(h, b))) + join(h, b)[8:],
                                   "not a readable safetensors file"),
    "header not JSON": (_raw_header(b"{not json"), "not a readable safetensors file"),
    "header a list": (_raw_header(b"[1, 2]"), "not a readable safetensors file"),
    "metadata value an object": (lambda h, b: (h["__metadata__"].update(peftlite={"a": 1}), join(h, b))[1],
                                 "not a readable safetensors file"),
    "non-UTF-8 metadata": (_metadata_bytes(b"peftlite-adapter", b"peftlite-\xff\xfeapter"),
                           "not a readable safetensors file"),
    "lone surrogate in metadata": (_metadata_bytes(b"peftlite-adapter", b"peftlite-\\ud800"),
                                   "not a readable safetensors file"),
    "no peftlite metadata": (lambda h, b: (h["__metadata__"].pop("peftlite"), join(h, b))[1],
                             "without peftlite metadata"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_crafted_headers(tmp_path, good, case):
    data, _ = good
    edit, what = HEADERS[case]
    header, body = split(data)
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(edit(header, body))
    refused(path, targets(), what)


CONFIG_TEXTS = {
    "not JSON": ("{'format': 1", "corrupt peftlite metadata"),
    "null": ("null", "is not a peftlite-adapter config"),
    "a list": ("[1]", "is not a peftlite-adapter config"),
    "a string": ('"peftlite-adapter"', "is not a peftlite-adapter config"),
    "nested 100000 deep": ("[" * 100000 + "]" * 100000, "corrupt peftlite metadata"),
}


@pytest.mark.parametrize("case", list(CONFIG_TEXTS))
def test_metadata_that_is_not_a_config(tmp_path, good, case):
    text, what = CONFIG_TEXTS[case]
    path = tmp_path / "meta.safetensors"
    path.write_bytes(with_config(good[0], text))
    refused(path, targets(), what, AdapterFileError)


DELETE = object()
# (field path, value, what the error says); every one is refused on all three load paths
CONFIGS = [
    (("format",), "other", "not a peftlite-adapter config"),
    (("format",), DELETE, "not a peftlite-adapter config"),
    (("format_version",), 0, "format_version 0"),
    (("format_version",), "1", "format_version '1'"),
    (("format_version",), 1.5, "format_version 1.5"),
    (("format_version",), True, "format_version True"),
    (("format_version",), 99, "newer than this peftlite reads"),
    (("format_version",), DELETE, "format_version None"),
    (("layers",), [], "lacks 'layers'"),
    (("layers",), DELETE, "lacks 'layers'"),
    (("heads",), None, "lacks 'heads'"),
    (("trainable",), "norm", "lacks 'trainable'"),
    (("trainable",), [5], "not a string"),
    (("train_bn",), "no", "lacks 'train_bn'"),
    (("partial",), "no", "partial is 'no'"),
    (("partial",), 1, "partial is 1"),
    (("adapter",), "", "adapter name ''"),
    (("adapter",), "a.b", "adapter name 'a.b'"),
    (("adapter",), 5, "adapter name 5"),
    (("layers", "fc1"), "linear", "layer entry 'fc1' is malformed"),
    (("layers", "fc1", "kind"), "conv3d", "layer entry 'fc1' is malformed"),
    (("layers", "fc1", "kind"), DELETE, "layer entry 'fc1' is malformed"),
    (("layers", "fc1", "kind"), "conv2d", "the file adapts a conv2d layer"),
    (("layers", "fc1", "rank"), 0, "rank 0"),
    (("layers", "fc1", "rank"), -2, "rank -2"),
    (("layers", "fc1", "rank"), "2", "rank '2'"),
    (("layers", "fc1", "rank"), 2.0, "rank 2.0"),
    (("layers", "fc1", "rank"), True, "rank True"),
    (("layers", "fc1", "rank"), DELETE, "rank None"),
    (("layers", "fc1", "rank"), 10 ** 12, "has rank 1000000000000"),
    (("layers", "fc1", "rank"), 3, r"shape \(2, 4\), but its layer 'fc1' has rank 3"),
    (("layers", "fc1", "alpha"), 0, "alpha 0"),
    (("layers", "fc1", "alpha"), -1.0, "alpha -1.0"),
    (("layers", "fc1", "alpha"), "x", "alpha 'x'"),
    (("layers", "fc1", "alpha"), math.nan, "alpha nan"),
    (("layers", "fc1", "alpha"), math.inf, "alpha inf"),
    (("layers", "fc1", "alpha"), 10 ** 400, "alpha 1000"),
    (("layers", "fc1", "dropout"), -0.1, "dropout -0.1"),
    (("layers", "fc1", "dropout"), 1.0, "dropout 1.0"),
    (("layers", "fc1", "dropout"), "0", "dropout '0'"),
    (("layers", "fc1", "dropout"), math.nan, "dropout nan"),
    (("layers", "fc1", "slots"), "weight", "slots 'weight'"),
    (("layers", "fc1", "slots"), [1], r"slots \[1\]"),
    (("layers", "fc1", "variant"), "vera", "variant 'vera'"),
    (("layers", "fc1", "rank_scaling"), "log", "rank_scaling 'log'"),
    (("layers", "fc1", "in_features"), 5, "in_features: file 5, model 4"),
    (("layers", "fc1", "in_features"), "4", "in_features: file '4', model 4"),
    (("layers", "conv", "padding"), [0, 0], r"padding: file \[0, 0\], model \[1, 1\]"),
    (("layers", "nope"), {"kind": "linear", "rank": 2, "alpha": 2.0}, "'nope'"),
    (("heads", "cls"), "Linear", "head entry 'cls' is malformed"),
    (("heads", "cls", "type"), 5, "head entry 'cls' is malformed"),
    (("heads", "cls", "in_features"), "x", "head 'cls' cannot be built"),
    (("heads", "cls", "in_features"), -1, "head 'cls' cannot be built"),
    (("heads", "cls", "in_features"), DELETE, "head 'cls' cannot be built"),
    (("heads", "cls", "in_features"), 10 ** 9, "1000000000"),
    (("heads", "cls", "out_features"), 3 * 10 ** 9, "3000000000"),
]


@pytest.mark.parametrize("field, value, what", CONFIGS, ids=[f"{'.'.join(f)}={v!r}"[:60] for f, v, _ in CONFIGS])
def test_configs_with_wrong_fields(tmp_path, good, field, value, what):
    header, body = split(good[0])
    config = config_of(header)
    holder = config
    for key in field[:-1]:
        holder = holder[key]
    if value is DELETE:
        del holder[field[-1]]
    else:
        holder[field[-1]] = value
    path = tmp_path / "config.safetensors"
    path.write_bytes(with_config(good[0], json.dumps(config)))
    start = time.perf_counter()
    refused(path, targets(), what)
    assert time.perf_counter() - start < 5  # a huge rank or head is refused before anything is allocated


def test_trainable_names_the_model_lacks(tmp_path, good):
    header, _ = split(good[0])
    config = config_of(header)
    config["trainable"] = ["nope"]
    path = tmp_path / "trainable.safetensors"
    path.write_bytes(with_config(good[0], json.dumps(config)))
    refused(path, {"fresh": base()}, "trains 'nope'")  # a wrapped model's trainable set is its own


def _peak_growth(fn) -> int:
    """Peak RSS growth (bytes) while ``fn`` runs: VmHWM after resetting it through /proc/self/clear_refs."""
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def test_a_declared_terabyte_allocates_nothing(tmp_path, good):
    """safetensors checks that offsets tile the data section and end at the end of the file before it makes
    any tensor (``read_metadata`` on the mmap, then storage); a 1 TB declaration fails at once."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs")
    header, body = split(good[0])
    small = tmp_path / "small.safetensors"
    small.write_bytes(_terabyte(dict(header), body))
    # The same, where the file really is 1 TB (sparse): valid for safetensors, refused by the shapes.
    header, body = split(good[0])
    weight = header.pop("cls.weight")
    s, e = weight["data_offsets"]
    body = body[:s] + body[e:]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= e:
            entry["data_offsets"] = [o - (e - s) for o in entry["data_offsets"]]
    end = len(body)
    header["cls.weight"] = {"dtype": "F32", "shape": [2 ** 18, 2 ** 20], "data_offsets": [end, end + 2 ** 40]}
    big = tmp_path / "big.safetensors"
    big.write_bytes(join(header, body))
    try:
        with open(big, "r+b") as f:
            f.truncate(os.path.getsize(big) + 2 ** 40)
    except OSError:
        big = None  # no sparse files here
    for path, what in ((small, "incomplete metadata"), (big, r"cls\.weight has shape \(262144, 1048576\)")):
        if path is None:
            continue
        for model in targets().values():
            start = time.perf_counter()
            grew = _peak_growth(lambda m=model, p=path, w=what: refused(p, {"m": m}, w))
            assert grew < 64 * 2 ** 20, f"{path.name}: RSS grew {grew / 2 ** 20:.0f} MiB"
            assert time.perf_counter() - start < 2
    if big is not None:
        os.unlink(big)


def test_files_that_are_not_adapters(tmp_path, good):
    models = targets()
    cases = {
        "pickle.safetensors": pickle.dumps({"fc1.lora.default.A": [[0.0] * 4] * 2}),
        "zip.safetensors": b"PK\x03\x04" + bytes(200),  # torch.save's zip container
        "empty.safetensors": b"",
        "random.safetensors": random.Random(3).randbytes(4096),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(tmp_path / name, models, "not a readable safetensors file", AdapterFileError)
    (tmp_path / "folder.safetensors").mkdir()
    refused(tmp_path / "folder.safetensors", models, "a folder without adapter_config.json", AdapterFileError)
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it for reading would block forever
    refused(tmp_path / "fifo.safetensors", models, "not a regular file", AdapterFileError)
    # A missing path is an OSError, as open() raises; not a ValueError.
    missing = tmp_path / "missing.safetensors"
    refused(missing, models, "does not exist", FileNotFoundError)
    assert not issubclass(FileNotFoundError, ValueError)


# ---- NaN and Inf ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["conv.lora.default.A", "out.lora.default.B"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_adapter_values_are_refused(tmp_path, key, bad):
    """Refused as the tensor is read: ``out`` is read after ``norm``, a trainable module already written
    in place by then, so this checks the roll-back of a load that fails midway too."""
    model = adapted()
    with torch.no_grad():
        t = model.state_dict()[key]
        t.view(-1)[0] = bad
        t.view(-1)[-1] = bad
    path = peftlite.save(model, tmp_path / "nan.safetensors")
    refused(path, targets(), rf"{re.escape(key)} holds 2 non-finite value\(s\) \(NaN or Inf\) of {t.numel()}",
            AdapterFileError)
    tensors, _ = peftlite.formats.native.read(path)  # still readable, to inspect
    assert int(torch.isfinite(tensors[key]).logical_not().sum()) == 2


def test_non_finite_head_values_load_as_saved(tmp_path):
    """The policy covers adapter tensors; heads and trainable tensors are the user's (a mask may be -inf)."""
    model = adapted()
    with torch.no_grad():
        model.cls.bias[0] = -math.inf
    path = peftlite.save(model, tmp_path / "inf_head.safetensors")
    fresh = peftlite.load(base(), path)
    assert fresh.cls.bias[0] == -math.inf


def test_load_reads_one_tensor_at_a_time(tmp_path, good, monkeypatch):
    """The file's tensors are read as they are copied in; at most the previous one is alive at each read."""
    path = tmp_path / "a.safetensors"
    path.write_bytes(good[0])
    real = _safetensors.TensorFile.__getitem__
    alive, worst = [], [0]

    def getitem(self, key):
        worst[0] = max(worst[0], sum(r() is not None for r in alive))
        t = real(self, key)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(_safetensors.TensorFile, "__getitem__", getitem)
    for model in targets().values():
        alive.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "new": the shared trainable norm changes, and load says so
            peftlite.load(model, path)
        assert len(alive) >= 10 and worst[0] <= 1


# ---- PEFT directories -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    return peftlite.save(adapted(), tmp_path_factory.mktemp("peft") / "adapter", format="peft")


def _copy_dir(src, dst, config=None, config_bytes=None):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    if config is not None:
        config_bytes = json.dumps(config).encode()
    if config_bytes is not None:
        with open(os.path.join(dst, "adapter_config.json"), "wb") as g:
            g.write(config_bytes)
    return dst


def peft_targets() -> dict[str, nn.Module]:
    """As ``targets``, with a fresh base whose ``cls`` fits the head: PEFT's modules_to_save keep the module."""
    models = targets()
    models["fresh"].cls = nn.Linear(4, 3)
    return models


def test_the_undamaged_peft_directory_loads_on_every_path(tmp_path, peft_dir):
    for model in peft_targets().values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftlite.load(model, peft_dir)
        assert model.fc1.lora["default"].B.abs().sum() > 0


def test_peft_config_damaged(tmp_path, peft_dir):
    raw = open(os.path.join(peft_dir, "adapter_config.json"), "rb").read()
    models = peft_targets()
    cuts = sorted(random.Random(4).sample(range(len(raw) - 2), 10))
    texts = {f"cut{c}": raw[:c] for c in cuts}
    texts.update({"garbage": b"\x00garbage", "list": b"[1, 2]", "null": b"null", "number": b"7",
                  "non-UTF-8": raw.replace(b'"LORA"', b'"LO\xffRA"'), "deep": b"[" * 100000 + b"]" * 100000})
    for label, text in texts.items():
        folder = _copy_dir(peft_dir, str(tmp_path / label), config_bytes=text)
        refused(folder, models, "adapter_config.json: not readable JSON|not a JSON object", AdapterFileError)


PEFT_CONFIGS = [
    ("r", 10 ** 12, "gives it rank 1000000000000"),
    ("r", -1, "r must be a positive number"),
    ("r", 0, "r must be a positive number"),
    ("r", "8", "r must be a positive number"),
    ("r", True, "r must be a positive number"),
    ("r", math.nan, "r must be a positive number"),
    ("r", DELETE, "r must be a positive number"),
    ("lora_alpha", -1, "lora_alpha must be a positive number"),
    ("lora_alpha", math.inf, "lora_alpha must be a positive number"),
    ("lora_alpha", "16", "lora_alpha must be a positive number"),
    ("lora_alpha", 10 ** 400, "lora_alpha must be a positive number"),
    ("target_modules", 5, "target_modules must be"),
    ("target_modules", {"fc1": 1}, "target_modules must be"),
    ("target_modules", [1], "target_modules must be"),
    ("target_modules", "fc1(", "not a regular expression"),
    ("target_modules", "^fc9$", "does not select it"),
    ("rank_pattern", ["fc1"], "rank_pattern must be a JSON object"),
    ("rank_pattern", "fc1", "rank_pattern must be a JSON object"),
    ("rank_pattern", {"fc1": -1}, "rank_pattern"),
    ("rank_pattern", {"fc1": 10 ** 9}, "gives it rank 1000000000"),
    ("rank_pattern", {"(": 2}, "not a regular expression"),
    ("alpha_pattern", {"fc1": "x"}, "alpha_pattern"),
    ("alpha_pattern", {"fc1": None}, "alpha_pattern"),
    ("alpha_pattern", {"fc1": -3}, "alpha_pattern"),
    ("modules_to_save", "cls", "modules_to_save must be"),
    ("modules_to_save", [5], "modules_to_save must be"),
    ("modules_to_save", [""], "modules_to_save must be"),
    ("modules_to_save", None, "neither a LoRA weight nor under modules_to_save"),
    ("lora_dropout", "x", "lora_dropout"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("use_dora", "yes", "use_dora must be true or false"),
    ("use_dora", True, "lacks a DoRA lora_magnitude_vector"),
    ("use_rslora", 1, "use_rslora must be true or false"),
    ("peft_type", "IA3", "peft_type 'IA3'"),
    ("peft_type", DELETE, "peft_type None"),
    ("bias", "all", "bias='all'"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
]


@pytest.mark.parametrize("field, value, what", PEFT_CONFIGS,
                         ids=[f"{f}={v!r}"[:50] for f, v, _ in PEFT_CONFIGS])
def test_peft_config_hostile_values(tmp_path, peft_dir, field, value, what):
    config = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    if value is DELETE:
        del config[field]
    else:
        config[field] = value
    folder = _copy_dir(peft_dir, str(tmp_path / "hostile"), config=config)
    refused(folder, peft_targets(), what, (AdapterFileError, PeftFormatError))


def test_peft_weights_damaged(tmp_path, peft_dir):
    models = peft_targets()
    weights = open(os.path.join(peft_dir, "adapter_model.safetensors"), "rb").read()
    folder = _copy_dir(peft_dir, str(tmp_path / "cut"))
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(weights[: len(weights) // 2])
    refused(folder, models, "adapter_model.safetensors: not a readable safetensors file", AdapterFileError)
    folder = _copy_dir(peft_dir, str(tmp_path / "nan"))
    header, body = split(weights)
    key = "base_model.model.fc2.lora_B.weight"
    s, _ = header[key]["data_offsets"]
    body = body[:s] + struct.pack("<f", math.nan) + body[s + 4:]
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(join(header, body))
    refused(folder, models, r"fc2\.lora\.default\.B holds 1 non-finite", AdapterFileError)
    folder = _copy_dir(peft_dir, str(tmp_path / "pickle"))
    os.rename(os.path.join(folder, "adapter_model.safetensors"), os.path.join(folder, "adapter_model.bin"))
    refused(folder, models, "a pickle, which peftlite never loads", AdapterFileError)
    folder = _copy_dir(peft_dir, str(tmp_path / "config_dir"))
    os.unlink(os.path.join(folder, "adapter_config.json"))
    os.mkdir(os.path.join(folder, "adapter_config.json"))
    refused(folder, models, "a folder without adapter_config.json", AdapterFileError)
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, models, "a folder without adapter_config.json", AdapterFileError)


def test_a_file_cut_short_while_it_is_read(tmp_path, good, monkeypatch):
    """Another process truncates the file midway through a load: the read fails, the load is undone.

    Needs safetensors' pread reader (0.8+): with a memory map, reading past the new end is a SIGBUS."""
    from safetensors import safe_open
    (tmp_path / "probe.safetensors").write_bytes(good[0])
    try:
        safe_open(str(tmp_path / "probe.safetensors"), "pt", backend="pread").__exit__(None, None, None)
    except TypeError:
        pytest.skip("safetensors before 0.8 maps the file: a truncation midway is a SIGBUS")
    real = _safetensors.TensorFile.__getitem__
    count = [0]

    def getitem(self, key):
        count[0] += 1
        if count[0] == 5:
            os.truncate(self.path, 200)
        return real(self, key)

    monkeypatch.setattr(_safetensors.TensorFile, "__getitem__", getitem)
    for label, model in targets().items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(good[0])
        count[0] = 0
        refused(path, {label: model}, "could not be read", AdapterFileError)
