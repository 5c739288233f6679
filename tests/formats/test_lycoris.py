"""LyCORIS / kohya single files, both ways, checked against the real ``lycoris`` package on a small diffusers UNet."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from conftest import assert_unchanged, snapshot
from peftlite import LycorisFormatError
from peftlite.formats import lycoris as lyco_format
from peftlite.layers import spec as adapter_spec

lycoris = pytest.importorskip("lycoris")
diffusers = pytest.importorskip("diffusers")
from lycoris import create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.logging import logger as lycoris_logger  # noqa: E402

lycoris_logger.setLevel(logging.ERROR)
needs_lokr = pytest.mark.skipif("lokr" not in adapter_spec.KINDS, reason="this peftlite has no LoKr adapters yet")


def unet() -> nn.Module:
    """A tiny SD-style UNet (cross-attention, resnets, down/upsamplers; 3x3 and 1x1 convs), random init."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return unet()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A tiny UNet's tensors, where intra-op threads only add synchronisation: on a loaded 2-core machine two
    threads made this module about 5 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


G = torch.Generator().manual_seed(9)
SAMPLE, STEPS, TEXT = torch.randn(2, 4, 8, 8, generator=G), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=G)


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(SAMPLE, STEPS, TEXT).sample


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to fp32 rounding through the UNet (LyCORIS adds ΔW to W, peftlite runs the factors beside it; the
    threads' reduction order varies too): 2e-5 of the output's scale, where a wrong scale or layout is ~1e-1."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * max(1.0, b.abs().max().item()))


def randomise(params, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero values for every factor (up factors start at zero), so the adapted outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lycoris_file(base: nn.Module, path, algo: str, **kw) -> torch.Tensor:
    """Wrap a copy of ``base`` with ``lycoris.create_lycoris``, give it random factors, save it to ``path``;
    returns LyCORIS's outputs."""
    model = copy.deepcopy(base)
    kw = {"linear_dim": 4, "linear_alpha": 2, "conv_dim": 4, "conv_alpha": 3, **kw}
    net = create_lycoris(model, 1.0, algo=algo, **kw)
    net.apply_to()
    randomise([p for n, p in net.named_parameters() if "alpha" not in n], std=0.5 if algo != "lora" else 0.3)
    net.save_weights(str(path), None, None)
    return run(model)


# ---- LyCORIS -> peftlite --------------------------------------------------------------------------

ALGOS = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": pytest.param(dict(algo="lokr", factor=4), marks=needs_lokr),
    "lokr-both": pytest.param(dict(algo="lokr", decompose_both=True, linear_dim=2, conv_dim=2), marks=needs_lokr),
    "lokr-tucker": pytest.param(dict(algo="lokr", use_tucker=True, factor=8, conv_dim=2), marks=needs_lokr),
    "lokr-full": pytest.param(dict(algo="lokr", full_matrix=True), marks=needs_lokr),
}


@pytest.mark.parametrize("kw", ALGOS.values(), ids=ALGOS.keys())
def test_a_lycoris_file_loads_with_lycoris_outputs(base, tmp_path, kw):
    path = tmp_path / "l.safetensors"
    expected = lycoris_file(base, path, **kw)
    assert not torch.allclose(expected, run(base), atol=1e-3)  # the adapter does something
    model = peftlite.load(copy.deepcopy(base), path)
    close(run(model), expected)
    tucker = any(k.endswith(("lora_mid.weight", "hada_t1", "lokr_t2")) for k in load_file(path))
    assert tucker == bool(kw.get("use_tucker"))


def test_the_file_is_told_apart_by_its_keys_or_named(base, tmp_path):
    path = tmp_path / "l.safetensors"
    expected = lycoris_file(base, path, "lora")
    close(run(peftlite.load(copy.deepcopy(base), path, format="lycoris", name="style")), expected)
    with pytest.raises(ValueError, match="prefix= selects a LyCORIS file"):
        peftlite.load(copy.deepcopy(base), path, format="peftlite", prefix="lycoris")
    with pytest.raises(ValueError, match="format must be one of 'peftlite', 'peft', 'lycoris' or None"):
        peftlite.load(copy.deepcopy(base), path, format="kohya")
    with pytest.raises(peftlite.AdapterFileError, match="without peftlite metadata"):
        peftlite.load(copy.deepcopy(base), path, format="peftlite")


def test_a_lycoris_file_adds_a_named_adapter_to_a_wrapped_model(base, tmp_path):
    path = tmp_path / "l.safetensors"
    expected = lycoris_file(base, path, "loha")
    model = peftlite.wrap(copy.deepcopy(base), ["conv_in", "*.to_q"], rank=2)
    peftlite.load(model, path, name="style")
    peftlite.use(model, "style")
    close(run(model), expected)


# ---- peftlite -> LyCORIS --------------------------------------------------------------------------

SAVES = {
    "lora": dict(kind="lora", rank=4, alpha=8.0),
    "rslora": dict(kind="lora", rank=4, alpha=3.0, rank_scaling="sqrt"),
    "loha": dict(kind="loha", rank=3, alpha=5.0),
}


@pytest.mark.parametrize("kw", SAVES.values(), ids=SAVES.keys())
def test_a_peftlite_file_loads_in_lycoris_with_equal_outputs(base, tmp_path, kw):
    model = peftlite.wrap(copy.deepcopy(base), (nn.Linear, nn.Conv2d), **kw)
    randomise([p for n, p in model.named_parameters() if ".lora." in n], std=0.3 if kw["kind"] == "lora" else 0.5)
    expected = run(model)
    path = peftlite.save(model, tmp_path / "p.safetensors", format="lycoris")
    keys = load_file(path)
    assert all(k.startswith("lycoris_") for k in keys) and keys["lycoris_conv_in.alpha"].dim() == 0
    if kw["kind"] == "lora":
        assert keys["lycoris_conv_in.lora_down.weight"].shape == (4, 4, 3, 3)
        assert keys["lycoris_conv_in.lora_up.weight"].shape == (32, 4, 1, 1)
    theirs = copy.deepcopy(base)
    net, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    net.apply_to()
    assert len(net.loras) == sum(k.endswith(".alpha") for k in keys)  # LyCORIS found every entry
    close(run(theirs), expected)
    close(run(peftlite.load(copy.deepcopy(base), path)), expected)  # and back


@needs_lokr
@pytest.mark.parametrize("kw", [dict(factor=4), dict(full_matrix=True)], ids=["factor4", "full"])
def test_a_lokr_file_goes_through_peftlite_and_back_into_lycoris(base, tmp_path, kw):
    """Layouts LyCORIS's own loader rebuilds (it cannot reload its decompose_both or Tucker LoKr files)."""
    expected = lycoris_file(base, tmp_path / "l.safetensors", "lokr", **kw)
    model = peftlite.load(copy.deepcopy(base), tmp_path / "l.safetensors")
    path = peftlite.save(model, tmp_path / "p.safetensors", format="lycoris")
    theirs = copy.deepcopy(base)
    create_lycoris_from_weights(1.0, str(path), theirs)[0].apply_to()
    close(run(theirs), expected)


@needs_lokr
def test_a_full_lokr_is_written_with_its_scale_in_w1(base, tmp_path):
    """LyCORIS computes a full/full LoKr at scale 1, so peftlite's alpha / rank goes into lokr_w1."""
    model = peftlite.wrap(copy.deepcopy(base), ["*.to_q", "*.ff.net.2"], kind="lokr", rank=8, alpha=3.0)
    randomise([p for n, p in model.named_parameters() if ".lora." in n], std=0.5)
    path = peftlite.save(model, tmp_path / "p.safetensors", format="lycoris")
    assert not any(k.endswith(("lokr_w1_a", "lokr_w2_a")) for k in load_file(path))
    theirs = copy.deepcopy(base)
    create_lycoris_from_weights(1.0, str(path), theirs)[0].apply_to()
    close(run(theirs), run(model))


@needs_lokr
@pytest.mark.parametrize("kw", [dict(rank=2), dict(rank=2, decompose_both=True)], ids=["w2-low-rank", "both"])
def test_a_peftlite_lokr_file_holds_the_kronecker_product_lycoris_computes(base, tmp_path, kw):
    """PEFT's split (peftlite's when wrapping) is one LyCORIS's loader does not rebuild from the shapes (ComfyUI's
    and A1111's take any), so each entry is checked with LyCORIS's own kron_weight against peftlite's merged ΔW."""
    from lycoris.functional.lokr import kron_weight

    model = peftlite.wrap(copy.deepcopy(base), (nn.Linear, nn.Conv2d), kind="lokr", alpha=3.0, **kw)
    randomise([p for n, p in model.named_parameters() if ".lora." in n], std=0.5)
    f = load_file(peftlite.save(model, tmp_path / "p.safetensors", format="lycoris"))
    peftlite.merge(model)
    for name, module in base.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        key = f"lycoris_{name.replace('.', '_')}"
        parts = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
        w1, w1_a, w1_b, w2, w2_a, w2_b = (f.get(f"{key}.lokr_{s}") for s in parts)
        rank = next((t.shape[1] for t in (w1_a, w2_a) if t is not None), None)
        scale = 1.0 if rank is None else f[f"{key}.alpha"].item() / rank  # LyCORIS's rule: 1 when both are full
        delta = kron_weight(w1, w1_a, w1_b, w2, w2_a, w2_b, scale=scale)
        theirs = module.weight + delta.reshape(module.weight.shape)
        torch.testing.assert_close(model.get_submodule(name).weight, theirs, rtol=1e-5, atol=1e-5)


class Grouped(nn.Module):
    """A grouped and a depthwise conv, and a Linear: geometries a UNet does not have."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12)
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return self.fc(self.depthwise(self.grouped(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_grouped_and_dilated_convs_go_both_ways(tmp_path, kind):
    torch.manual_seed(0)
    model = peftlite.wrap(Grouped().eval(), (nn.Conv2d, nn.Linear), rank=2, alpha=3, kind=kind)
    randomise([p for n, p in model.named_parameters() if ".lora." in n], std=0.5)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = model(x)
    path = peftlite.save(model, tmp_path / "g.safetensors", format="lycoris")
    torch.manual_seed(0)
    theirs = Grouped().eval()
    create_lycoris_from_weights(1.0, str(path), theirs)[0].apply_to()
    with torch.no_grad():
        close(theirs(x), expected)


# ---- kohya names and prefixes ---------------------------------------------------------------------

def kohya_file(base, tmp_path, algo="lora"):
    """A whole-pipeline kohya-style file: the UNet's entries as lora_unet_..., and text-encoder entries."""
    lyco = tmp_path / "l.safetensors"
    expected = lycoris_file(base, lyco, algo)
    tensors = {k.replace("lycoris_", "lora_unet_", 1): t for k, t in load_file(lyco).items()}
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors.update({f"{te}.lora_down.weight": torch.randn(4, 32), f"{te}.lora_up.weight": torch.randn(64, 4),
                    f"{te}.alpha": torch.tensor(4.0)})
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})
    return path, expected


def test_a_whole_pipeline_file_needs_the_prefix_and_then_loads_the_unets_entries(base, tmp_path):
    path, expected = kohya_file(base, tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(LycorisFormatError, match=r"lora_unet_ \(83 modules.*lora_te_ \(1 module,.*prefix='lora_unet'"):
        peftlite.load(model, path)
    assert_unchanged(model, before)
    with pytest.raises(LycorisFormatError, match="lora_te_text_model_encoder_layers_0_mlp_fc1 maps to no module"):
        peftlite.load(model, path, prefix="lora_te")
    assert_unchanged(model, before)
    with pytest.raises(LycorisFormatError, match="no entry starts with prefix 'lora_te2'"):
        peftlite.load(model, path, prefix="lora_te2")
    close(run(peftlite.load(model, path, prefix="lora_unet")), expected)


def test_save_writes_a_kohya_prefix(base, tmp_path):
    model = peftlite.wrap(copy.deepcopy(base), ["*.to_k", "*.conv1"], rank=2)
    randomise([p for n, p in model.named_parameters() if ".lora." in n])
    path = peftlite.save(model, tmp_path / "k.safetensors", format="lycoris", prefix="lora_unet")
    assert {k.partition(".")[0] for k in load_file(path)} >= {"lora_unet_down_blocks_0_resnets_0_conv1"}
    assert all(k.startswith("lora_unet_") for k in load_file(path))
    close(run(peftlite.load(copy.deepcopy(base), path)), run(model))
    half = load_file(peftlite.save(model, tmp_path / "h.safetensors", format="lycoris", dtype=torch.bfloat16))
    assert {t.dtype for k, t in half.items() if not k.endswith("alpha")} == {torch.bfloat16}
    assert {t.dtype for k, t in half.items() if k.endswith("alpha")} == {torch.float32}
    for bad in ("", "a.b", "lora_", 3):
        with pytest.raises(ValueError, match="prefix must be"):
            peftlite.save(model, tmp_path / "x.safetensors", format="lycoris", prefix=bad)
    with pytest.raises(ValueError, match="pass format='lycoris'"):
        peftlite.save(model, tmp_path / "x.safetensors", prefix="lora_unet")


@pytest.mark.parametrize("name", ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_time_embed_0"])
def test_sdxl_sgm_block_names_are_refused_by_name(base, tmp_path, name):
    path = tmp_path / "sgm.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4)}, path)
    with pytest.raises(LycorisFormatError, match=rf"{name} uses SDXL's original \(SGM\) block names"):
        peftlite.load(copy.deepcopy(base), path)


class Twins(nn.Module):
    """``a_b.c`` and ``a.b_c`` are both ``a_b_c`` with their dots as underscores."""

    def __init__(self):
        super().__init__()
        self.a_b = nn.ModuleDict({"c": nn.Linear(4, 4)})
        self.a = nn.ModuleDict({"b_c": nn.Linear(4, 4)})
        self.d = nn.Linear(4, 4)


def test_a_name_two_modules_share_is_refused_with_both(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"lycoris_a_b_c.lora_down.weight": torch.randn(2, 4), "lycoris_a_b_c.lora_up.weight": torch.randn(4, 2)},
              path)
    model = Twins()
    before = snapshot(model)
    with pytest.raises(LycorisFormatError, match=r"lycoris_a_b_c matches 2 modules of the model \(a_b.c, a.b_c\)"):
        peftlite.load(model, path)
    assert_unchanged(model, before)
    peftlite.wrap(model, ["a_b.c", "d"], rank=2)
    with pytest.raises(LycorisFormatError, match="a_b.c and a.b_c share the LyCORIS name lycoris_a_b_c"):
        peftlite.save(model, tmp_path / "x.safetensors", format="lycoris")


# ---- bad input: a clear error naming the key, the model untouched --------------------------------

def lora_entry(name: str, r: int = 2, fan_in: int = 32, out: int = 32) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(r, fan_in), f"{name}.lora_up.weight": torch.randn(out, r),
            f"{name}.alpha": torch.tensor(float(r))}


Q = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lycoris_conv_in"
BAD = {
    "oft": ({f"{Q}.oft_blocks": torch.randn(4, 8, 8), f"{Q}.alpha": torch.tensor(0.0)},
            f"{Q}.oft_blocks belongs to OFT"),
    "glora": ({f"{Q}.a1.weight": torch.randn(2, 32)}, f"{Q}.a1.weight belongs to GLoRA"),
    "ia3": ({f"{Q}.weight": torch.randn(32), f"{Q}.on_input": torch.tensor(False)}, r"belongs to \(IA\)³"),
    "full": ({f"{Q}.diff": torch.randn(32, 32)}, f"{Q}.diff belongs to full fine-tuning"),
    "dora": ({**lora_entry(Q), f"{Q}.dora_scale": torch.randn(32, 1)}, f"{Q}.dora_scale belongs to DoRA"),
    "unknown suffix": ({**lora_entry(Q), f"{Q}.lora_extra": torch.randn(2)}, f"{Q}.lora_extra is not a key of any"),
    "rank": ({**lora_entry(Q), f"{Q}.lora_up.weight": torch.randn(32, 3)},
             rf"{Q}.lora_up.weight has shape \(32, 3\), but the model's .*attn1.to_q .* at rank 2 .* needs \(32, 2\)"),
    "shape": (lora_entry(Q, fan_in=16), rf"{Q}.lora_down.weight has shape \(2, 16\).* needs \(2, 32\)"),
    "conv shape": ({f"{CONV}.lora_down.weight": torch.randn(2, 4, 1, 1),
                    f"{CONV}.lora_up.weight": torch.randn(32, 2, 1, 1)},
                   rf"{CONV}.lora_down.weight has shape \(2, 4, 1, 1\).* needs \(2, 4, 3, 3\)"),
    "loha ranks": ({f"{Q}.hada_w1_a": torch.randn(32, 2), f"{Q}.hada_w1_b": torch.randn(2, 32),
                    f"{Q}.hada_w2_a": torch.randn(32, 3), f"{Q}.hada_w2_b": torch.randn(3, 32)},
                   rf"{Q}.hada_w2_a has shape \(32, 3\).* at rank 2"),
    "half a pair": ({f"{Q}.lora_down.weight": torch.randn(2, 32)}, f"{Q}: is a lora entry without lora_up.weight"),
    "no module": (lora_entry("lycoris_down_blocks_9_attn_to_q"), "lycoris_down_blocks_9_attn_to_q maps to no module"),
    "not adaptable": (lora_entry("lycoris_conv_norm_out"), "names 'conv_norm_out', a GroupNorm"),
    "alpha": ({**lora_entry(Q), f"{Q}.alpha": torch.tensor(-1.0)}, f"{Q}: alpha is -1.0"),
    "no dot": ({"lycoris_conv_in": torch.randn(2), **lora_entry(Q)}, "'lycoris_conv_in' is not a LyCORIS key"),
    "mixed": ({**lora_entry(Q), f"{Q}.hada_w1_a": torch.randn(32, 2)}, "keys of lora and loha at once"),
    "mid on linear": ({**lora_entry(Q), f"{Q}.lora_mid.weight": torch.randn(2, 2, 1, 1)},
                      "lora_mid.weight .*the model's layer is a Linear"),
    "lokr half": pytest.param({f"{Q}.lokr_w1": torch.randn(4, 4), f"{Q}.lokr_w2_a": torch.randn(8, 2)},
                              "has lokr_w2_a for LoKr's W2: it needs lokr_w2, or both", marks=needs_lokr),
    "lokr split": pytest.param({f"{Q}.lokr_w1": torch.randn(5, 4), f"{Q}.lokr_w2": torch.randn(8, 8)},
                               r"W1 of shape \(5, 4\) does not split", marks=needs_lokr),
    "lokr w2": pytest.param({f"{Q}.lokr_w1": torch.randn(4, 4), f"{Q}.lokr_w2": torch.randn(8, 4)},
                            rf"{Q}.lokr_w2 has shape \(8, 4\).* needs \(8, 8\)", marks=needs_lokr),
    "lokr t1": ({f"{Q}.lokr_w1": torch.randn(4, 4), f"{Q}.lokr_t1": torch.randn(2, 2)}, "lokr_t1 belongs to LoKr"),
}


@pytest.mark.parametrize("entries, message", BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_key_and_leaves_the_model_untouched(base, tmp_path, entries, message):
    path = tmp_path / "bad.safetensors"
    good = {k: v for k, v in lora_entry("lycoris_time_embedding_linear_1", fan_in=32, out=128).items()}
    save_file({**good, **entries}, path)  # a good entry first: all or nothing
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(LycorisFormatError, match=message):
        peftlite.load(model, path)
    assert_unchanged(model, before)


def test_an_alpha_of_zero_or_none_means_the_rank(base, tmp_path):
    entry = lora_entry(Q)
    for alpha in (None, 0.0):
        tensors = {k: v for k, v in entry.items() if not k.endswith("alpha")}
        if alpha is not None:
            tensors[f"{Q}.alpha"] = torch.tensor(alpha)
        save_file(tensors, tmp_path / "a.safetensors")
        model = peftlite.load(copy.deepcopy(base), tmp_path / "a.safetensors")
        layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert layer.lora["default"].scale == 1.0


# ---- what a LyCORIS file cannot hold ------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("wrap, message", [
    (dict(targets="fc", variant="dora"), "fc is a dora layer"),
    (dict(targets="conv"), "padding_mode='reflect'"),
    (dict(targets="attn"), "attn is an adapted mha"),
    (dict(targets="fc", heads={"head": nn.Linear(4, 3)}), r"has heads \(head\)"),
    (dict(targets="fc", trainable="head"), r"fully trained modules \(head\)"),
])
def test_save_refuses_what_a_lycoris_file_cannot_hold(tmp_path, wrap, message):
    model = peftlite.wrap(Mixed(), wrap.pop("targets"), rank=2, **wrap)
    with pytest.raises(LycorisFormatError, match=message):
        peftlite.save(model, tmp_path / "x.safetensors", format="lycoris")
    assert not (tmp_path / "x.safetensors").exists()


class Reads(nn.Module):
    """A parent whose forward computes with its child's weight: LyCORIS, acting when fc is called, is bypassed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.fc.weight)


def test_a_layer_whose_weight_a_parent_reads_is_refused(tmp_path):
    model = peftlite.wrap(Reads(), "fc", rank=2)
    with pytest.raises(LycorisFormatError, match="Reads.forward reads fc.weight directly"):
        peftlite.save(model, tmp_path / "x.safetensors", format="lycoris")


def test_a_partial_save_is_refused(tmp_path):
    model = peftlite.wrap(Mixed(), "fc", rank=2)
    with pytest.raises(LycorisFormatError, match="partial adapter"):
        peftlite.save(model, tmp_path / "x.safetensors", format="lycoris", include="fc")


def test_tucker_in_is_the_rebuilt_weight():
    g = torch.Generator().manual_seed(0)
    core, down, up = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 3, 3, 3), (3, 5), (7, 3)))
    dense = torch.einsum("ijhw,pi,jq->pqhw", core, up, down)  # LyCORIS's rebuild_tucker
    torch.testing.assert_close((up @ lyco_format.tucker_in(core, down)).reshape(7, 5, 3, 3), dense)
