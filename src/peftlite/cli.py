"""The ``peftlite`` command: inspect, merge and convert adapter files, and run the demo.

    peftlite inspect adapter.safetensors [--json]      # a peftlite file or a PEFT adapter directory
    peftlite merge --model torchvision:resnet18 --weights base.safetensors \\
                   --adapter adapter.safetensors --out merged.safetensors [--kw num_classes=10]
    peftlite convert adapter.safetensors peft_dir --to peft     # and back: peft_dir file --to peftlite
    peftlite demo [--quick] [--out DIR] [--epochs N] [--seed S] [--no-progress] [--tensorboard DIR]

Bad paths and bad files give a one-line error on stderr and exit code 2 (``PEFTLITE_DEBUG=1`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter
from typing import Any

import torch
from torch import nn

from .demo import options as demo_options
from .formats import native, peft, schema
from .formats._safetensors import file_tensors, read_file, write_file
from .layers.spec import AdapterSpec
from .wrapping import unwrap

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command killed by SIGPIPE


class CliError(Exception):
    """A user error with a one-line message."""


# ---- reading either format ----------------------------------------------------------------------

def read_for_inspect(path: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(format, peftlite tensors, peftlite config, the file's own config) of a file or PEFT directory."""
    if os.path.isdir(path):
        raw_tensors, raw_config = peft.read_raw(path)
        tensors, config = peft.from_peft(raw_tensors, raw_config, path)
        return "peft", tensors, config, raw_config
    tensors, config = native.read(path)
    return "peftlite", tensors, config, config


def _file_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
    return os.path.getsize(path)


def describe_file(path: str) -> dict[str, Any]:
    """Everything ``inspect`` prints, as plain JSON-able data."""
    fmt, tensors, config, raw = read_for_inspect(path)
    layers = []
    owner = {k: schema.adapter_layer(k, config["layers"]) for k in tensors}
    for name, entry in config["layers"].items():
        own = {k: t for k, t in tensors.items() if owner[k] == name}
        spec = AdapterSpec.from_entry(entry, f"layer {name!r}")
        own_fields = {k: v for k, v in spec.entry().items()  # the kind's own fields (a LoKr split)
                      if k not in ("rank", "alpha", "dropout", "variant", "rank_scaling", "adapter_kind")}
        geometry = {k: v for k, v in entry.items() if k not in ("kind", "slots", "init", *spec.entry())}
        layers.append({"name": name, "kind": entry["kind"], "rank": spec.rank, "alpha": spec.alpha,
                       "scale": spec.scale, "rank_scaling": spec.rank_scaling, "variant": spec.variant,
                       "adapter_kind": spec.kind, **({"adapter_fields": own_fields} if own_fields else {}),
                       "dropout": spec.dropout, **({"init": entry["init"]} if "init" in entry else {}),
                       "tensors": {k[len(name) + 1:]: list(t.shape) for k, t in own.items()},
                       "params": sum(t.numel() for t in own.values()), "geometry": geometry})
    full = {}
    for name in list(config["heads"]) + list(config["trainable"]):
        own = {k: t for k, t in tensors.items() if owner[k] is None and (k == name or k.startswith(f"{name}."))}
        full[name] = {"type": config["heads"].get(name, {}).get("type", "trainable"),
                      "tensors": {k[len(name) + 1:]: list(t.shape) for k, t in own.items()},
                      "params": sum(t.numel() for t in own.values())}
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    meta = {k: v for k, v in raw.items() if k not in ("layers", "heads")}
    return {
        "path": path, "format": fmt, "layers": layers, "modules": full, "train_bn": config["train_bn"],
        "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "file_bytes": _file_bytes(path),
        "dtypes": dict(dtypes), "config": meta,
    }


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _adapter(layer: dict[str, Any]) -> str:
    """A layer's adapter in a few characters: its kind, DoRA / rsLoRA, a LoKr split (``lokr 4x3``)."""
    words = [layer.get("adapter_kind", "lora")]
    words += ["dora"] if layer.get("variant") == "dora" else []
    words += ["rs"] if layer.get("rank_scaling") == "sqrt" else []
    words += [f"from-{layer['init']}"] if "init" in layer else []  # a PiSSA / OLoRA adapter, as a plain LoRA
    kron = layer.get("adapter_fields", {}).get("kron")
    return "+".join(words) + (f" {kron[0]}x{kron[1]}" if kron else "")


def format_description(d: dict[str, Any]) -> str:
    out = [f"{d['path']}: {d['format']} adapter"]
    if d["layers"]:
        rows = [("layer", "kind", "adapter", "rank", "scale", "tensors", "params")]
        for layer in d["layers"]:
            shapes = " ".join(f"{k.split('.')[-1] if k.count('.') < 3 else k}:{_shape(s)}"
                              for k, s in layer["tensors"].items())
            rows.append((layer["name"], layer["kind"], _adapter(layer), str(layer["rank"]), f"{layer['scale']:g}",
                         shapes, f"{layer['params']:,}"))
        out += _table(rows)
    for name, m in d["modules"].items():
        shapes = ", ".join(f"{k} {_shape(s)}" for k, s in m["tensors"].items())
        out.append(f"{'head' if m['type'] != 'trainable' else 'trained'} {name} ({m['type']}): {shapes}; "
                   f"{m['params']:,} params")
    dtypes = ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items())
    out.append(f"{d['tensors']} tensors, {d['params']:,} params, {d['bytes']:,} bytes of tensors "
               f"({d['file_bytes']:,} on disk), dtype {dtypes}")
    shown = {k: v for k, v in d["config"].items() if v not in (None, {}, [], False)}
    out.append("config: " + json.dumps(shown, sort_keys=True))
    return "\n".join(out)


# ---- commands -----------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    d = describe_file(args.path)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0


def _parse_kw(pairs: list[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CliError(f"--kw {pair!r}: expected NAME=VALUE, e.g. --kw num_classes=10")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def build_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """``torchvision:NAME`` (random init, no download) or ``package.module:callable``."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise CliError(f"--model {spec!r}: expected torchvision:NAME or module:callable")
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise CliError(f"--model {spec!r}: torchvision has no model {name!r}")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as e:
            raise CliError(f"--model {spec!r}: cannot import it ({e})") from None
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def cmd_merge(args) -> int:
    model = build_model(args.model, _parse_kw(args.kw))
    state, _ = read_file(args.weights)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())[:300]
        raise CliError(f"{args.weights} does not fit {args.model} ({detail}); pass the constructor "
                       "arguments it was built with (e.g. --kw num_classes=10)") from None
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]  # a tied key is there
    if missing or result.unexpected_keys:
        raise CliError(f"{args.weights} does not fit {args.model}: missing {missing[:3]}, "
                       f"unexpected {result.unexpected_keys[:3]}; pass the constructor arguments it was "
                       "built with (e.g. --kw num_classes=10)")
    native.load(model, args.adapter)
    unwrap(model, merge=True, untie=args.untie)
    write_file(args.out, file_tensors(model.state_dict()), {"format": "pt"}, "merge")
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged ({len(model.state_dict())} tensors)")
    return 0


def cmd_convert(args) -> int:
    fmt, tensors, config, _ = read_for_inspect(args.src)
    if fmt == args.to:
        raise CliError(f"{args.src} is already in {fmt} format")
    if args.to == "peft":
        peft_tensors, adapter_config = peft.to_peft(tensors, config, where=args.src)
        peft.write(args.dst, peft_tensors, adapter_config)
    else:
        if os.path.isdir(args.dst):
            raise CliError(f"{args.dst} is a folder; a peftlite adapter is one .safetensors file")
        native.write(args.dst, tensors, config)
    print(f"wrote {args.dst} ({args.to} format, {len(config['layers'])} adapted layers)")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run  # imports torchvision's models (about 2 s): only for this command

    return run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlite", description="Inspect, merge and convert LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="describe an adapter file or PEFT directory")
    s.add_argument("path", help="a peftlite .safetensors file or a PEFT adapter directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=cmd_inspect)
    s = sub.add_parser("merge", help="write full weights with an adapter merged in")
    s.add_argument("--model", required=True, help="torchvision:NAME or module:callable that builds the model")
    s.add_argument("--weights", required=True, help="base weights (.safetensors state_dict)")
    s.add_argument("--adapter", required=True, help="peftlite adapter file or PEFT adapter directory")
    s.add_argument("--out", required=True, help="merged weights to write (.safetensors)")
    s.add_argument("--kw", action="append", default=[], metavar="NAME=VALUE",
                   help="constructor argument for --model, e.g. num_classes=10 (JSON values); repeatable")
    s.add_argument("--untie", action="store_true",
                   help="merge a layer whose weight another module shares (tied embeddings) into a copy of its own")
    s.set_defaults(run=cmd_merge)
    s = sub.add_parser("convert", help="peftlite file <-> PEFT directory (no model needed)")
    s.add_argument("src", help="input: a peftlite file or a PEFT adapter directory")
    s.add_argument("dst", help="output path")
    s.add_argument("--to", required=True, choices=("peft", "peftlite"))
    s.set_defaults(run=cmd_convert)
    s = sub.add_parser("demo", help="run the end-to-end demo (needs the demo extra)",
                       description=demo_options.DESCRIPTION)
    demo_options.add_arguments(s)
    s.set_defaults(run=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else [str(a) for a in argv])
    try:
        code = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `peftlite inspect x --json | head`: the reader has gone; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:  # and let the interpreter's final flush write to nowhere instead of failing again
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        finally:
            os.close(devnull)
        return EXIT_BROKEN_PIPE
    except Exception as e:  # one line, never a traceback, unless asked for
        if os.environ.get("PEFTLITE_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, (CliError, ValueError, OSError)):
            message = f"{type(e).__name__}: {message}"
        print(f"peftlite: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
