"""Module names as LyCORIS and kohya-style trainers key them: ``<prefix>_<module path, "." -> "_">``.

    lycoris_down_blocks_0_resnets_0_conv1       lycoris.create_lycoris (its default prefix)
    lora_unet_down_blocks_0_resnets_0_conv1     kohya-style trainers: the UNet (diffusers names)
    lora_te_text_model_encoder_layers_0_mlp_fc1 the text encoder (lora_te1_ / lora_te2_ for SDXL's two)

The underscores lose the dots, so a name is read back by building the underscored name of every Linear
and Conv2d of the model and matching: a name two modules share (``a_b.c`` and ``a.b_c``) is refused with
both candidates, never guessed. The prefix says whose entries they are: a whole-pipeline file holds the
UNet's and the text encoders'; ``select`` keeps the ones the caller names, and refuses a file of several
prefixes without that choice, so nothing is dropped without being asked.
"""

from __future__ import annotations

import difflib

from torch import nn

DEFAULT_PREFIX = "lycoris"
# Longest first, so that "lora_te1_x" is not read as "lora_te" + "1_x".
KNOWN_PREFIXES = ("lora_transformer", "lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris")
# SDXL's original (SGM) UNet layout, whose names diffusers' UNet does not have
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_")


class LycorisFormatError(ValueError):
    """A LyCORIS / kohya file or adapter that peftlite cannot translate exactly; the message names the key or
    feature and, where there is one, the fix."""


def underscored(name: str) -> str:
    """A module path as a LyCORIS key spells it: ``down_blocks.0.conv1`` -> ``down_blocks_0_conv1``."""
    return name.replace(".", "_")


def check_prefix(prefix: object, what: str) -> str:
    """``prefix`` if it can start a key (a non-empty name without dots), else a ValueError naming it."""
    if not isinstance(prefix, str) or not prefix or "." in prefix or prefix.endswith("_"):
        raise ValueError(f"{what}: prefix must be a non-empty name without dots or a trailing '_' (such as "
                         f"'lycoris', 'lora_unet', 'lora_te'), got {prefix!r}")
    return prefix


def prefix_of(lora_name: str) -> str | None:
    """The known prefix a key's module part starts with, or None."""
    return next((p for p in KNOWN_PREFIXES if lora_name.startswith(p + "_")), None)


def select(lora_names: list[str], prefix: str | None, where: str) -> tuple[str, list[str]]:
    """The prefix of the model's entries and those entries, from the file's module names (``lora_names``).

    With ``prefix``, the names that start with it (the others belong to another model of the pipeline, as
    the caller said). Without, the file must have one known prefix.

    Raises:
        LycorisFormatError: no name with the given prefix; names of an unknown prefix; several prefixes
            and no ``prefix=`` (each named, with the keyword that takes one).
    """
    if prefix is not None:
        mine = [n for n in lora_names if n.startswith(prefix + "_")]
        if not mine:
            found = sorted({prefix_of(n) or n for n in lora_names})
            raise LycorisFormatError(f"{where}: no entry starts with prefix {prefix!r}_; the file's entries start "
                                     f"with {', '.join(found[:6])}")
        return prefix, mine
    unknown = [n for n in lora_names if prefix_of(n) is None]
    if unknown:
        raise LycorisFormatError(
            f"{where}: {unknown[0]!r} starts with none of the known prefixes ({', '.join(KNOWN_PREFIXES)}); pass "
            "load(..., prefix=) with the prefix its trainer used")
    groups: dict[str, list[str]] = {}
    for n in lora_names:
        groups.setdefault(prefix_of(n), []).append(n)
    if len(groups) > 1:
        ranked = sorted(groups.items(), key=lambda g: -len(g[1]))
        listed = "; ".join(f"{p}_ ({len(ns)} module{'s' * (len(ns) > 1)}, e.g. {ns[0]})" for p, ns in ranked)
        raise LycorisFormatError(
            f"{where}: the file holds entries of {len(groups)} models: {listed}. Pass load(..., prefix=...) with this "
            f"model's prefix (prefix={ranked[0][0]!r}, say) to load only its entries")
    return next(iter(groups.items())) if groups else (DEFAULT_PREFIX, [])


def module_index(model: nn.Module) -> dict[str, list[str]]:
    """Every module's underscored name -> the module paths that give it (more than one: ambiguous)."""
    index: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        index.setdefault(underscored(name), []).append(name)
    return index


def resolve(lora_name: str, prefix: str, model: nn.Module, index: dict[str, list[str]], where: str) -> str:
    """The path of the Linear or Conv2d of ``model`` that the file's ``lora_name`` names.

    Raises:
        LycorisFormatError: no such module (SDXL's SGM block names named as such), or two candidates.
    """
    path = lora_name[len(prefix) + 1:]
    candidates = [n for n in index.get(path, []) if isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))]
    if len(candidates) > 1:
        raise LycorisFormatError(f"{where}: {lora_name} matches {len(candidates)} modules of the model "
                                 f"({', '.join(candidates)}); the underscored name cannot tell them apart")
    if candidates:
        return candidates[0]
    if prefix == "lora_unet" and path.startswith(SGM_BLOCKS):
        raise LycorisFormatError(
            f"{where}: {lora_name} uses SDXL's original (SGM) block names ({', '.join(b[:-1] for b in SGM_BLOCKS)}), "
            "which peftlite does not map to diffusers' (down_blocks, mid_block, up_blocks, time_embedding, "
            "add_embedding); convert the file to diffusers names first")
    others = index.get(path, [])
    if others:
        kind = type(model.get_submodule(others[0])).__name__
        raise LycorisFormatError(f"{where}: {lora_name} names {others[0]!r}, a {kind}; LyCORIS entries that "
                                 "peftlite reads adapt nn.Linear and nn.Conv2d layers")
    near = difflib.get_close_matches(path, [k for k in index if k], n=3)
    hint = f"; nearest: {', '.join(prefix + '_' + k for k in near)}" if near else ""
    raise LycorisFormatError(f"{where}: {lora_name} maps to no module of the model (no module path reads "
                             f"{path!r} with its dots as underscores); is it the file of another model?{hint}")
