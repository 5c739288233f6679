"""PEFT adapter directories, both ways, checked against the real ``peft`` package on the same base model."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftlite
from peftlite import AdapterFileError, PeftFormatError
from peftlite.formats import _direct_reads

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


class Net(nn.Module):
    """Convs of several geometries, Linears, and two layers named ``conv1`` (PEFT matches suffixes)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.ModuleDict({"0": nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
                                    "conv1": nn.Conv2d(8, 12, (1, 3), padding="same")})
        self.proj = nn.Linear(12, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):  # (N, 3, 8, 8) -> (N, classes)
        x = torch.relu(self.block["0"](torch.relu(self.conv1(x))))
        x = self.block["conv1"](x).mean((2, 3))
        return self.fc(self.mlp(self.proj(x)))


def base(seed: int = 0, classes: int = 5) -> Net:
    torch.manual_seed(seed)
    return Net(classes).eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))


def randomise(model: nn.Module, word: str, seed: int = 3) -> None:
    """Give every adapter tensor (``word`` in its name) random values, so that B is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if word in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to fp32 rounding, relative to the output's scale (random-init nets have large outputs)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


# ---- PEFT -> peftlite ----------------------------------------------------------------------------

CONFIGS = {
    "list": dict(r=4, lora_alpha=8, target_modules=["conv1", "proj", "mlp.0"]),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*(conv1|mlp\.[02])"),
    "rslora+patterns": dict(r=4, lora_alpha=6, target_modules=["conv1", "0", "2", "proj"], use_rslora=True,
                            rank_pattern={"block.conv1": 2, "mlp.2": 6}, alpha_pattern={"proj": 3}),
    "modules_to_save": dict(r=2, lora_alpha=5, target_modules=["proj", "block.0"], modules_to_save=["fc"]),
}


def peft_dir(tmp_path, name: str, **kw):
    model = get_peft_model(base(), LoraConfig(**CONFIGS[name], **kw))
    randomise(model, "lora_")
    if "modules_to_save" in CONFIGS[name]:
        randomise(model.base_model.model.fc.modules_to_save, "")
    model.eval()
    with torch.no_grad():
        expected = model(X)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_peft_dir_equals_peft(tmp_path, name):
    path, expected = peft_dir(tmp_path, name)
    model = peftlite.load(base(), path)
    close(model(X), expected)
    peftlite.merge(model)
    close(model(X), expected)
    s = peftlite.summary(model)
    assert s.trainable > 0


def test_load_peft_dir_ranks_and_alphas(tmp_path):
    path, _ = peft_dir(tmp_path, "rslora+patterns")
    model = peftlite.load(base(), path)
    assert model.block["conv1"].lora.default.rank == 2
    assert model.mlp[2].lora.default.rank == 6
    assert model.conv1.lora.default.rank == 4
    assert model.proj.lora.default.scale == pytest.approx(3 / 4 ** 0.5)
    assert model.mlp[2].lora.default.scale == pytest.approx(6 / 6 ** 0.5)


def test_load_peft_dir_into_wrapped_model(tmp_path):
    path, expected = peft_dir(tmp_path, "list")
    model = peftlite.load(base(), path)
    randomise(model, ".lora.", seed=4)  # different values, same structure
    assert not torch.allclose(model(X), expected)
    peftlite.load(model, path)
    close(model(X), expected)


def test_load_keys_without_prefix(tmp_path):
    path, expected = peft_dir(tmp_path, "modules_to_save")
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    assert all(k.startswith("base_model.model.") for k in tensors)
    bare = {k[len("base_model.model."):]: t for k, t in tensors.items()}
    save_file(bare, weights, metadata={"format": "pt"})
    close(peftlite.load(base(), path)(X), expected)


def test_load_real_torchvision_resnet(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    def resnet():
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=7).eval()

    x = torch.randn(2, 3, 32, 32)
    model = get_peft_model(resnet(), LoraConfig(r=4, lora_alpha=8, target_modules=r"layer\d\.\d\.conv\d",
                                                modules_to_save=["fc"]))
    randomise(model, "lora_")
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "rn")
    mine = peftlite.load(resnet(), tmp_path / "rn")
    with torch.no_grad():
        close(mine(x), expected)
    assert sum(".lora." in n and n.endswith(".A") for n, _ in mine.named_parameters()) == 16
    assert mine.fc.weight.requires_grad


# ---- peftlite -> PEFT ----------------------------------------------------------------------------

def wrapped(classes: int = 5) -> Net:
    model = base(classes=classes)
    peftlite.wrap(model, ["conv1", "block.0", "proj"], rank=4, alpha=8)
    peftlite.wrap(model, ["block.conv1", "mlp.*"], rank=2, alpha=3, heads={"fc": nn.Linear(16, classes)})
    randomise(model, ".lora.")
    return model.eval()


def test_save_peft_loads_in_peft(tmp_path):
    model = wrapped()
    with torch.no_grad():
        expected = model(X)
    out = peftlite.save(model, tmp_path / "out", format="peft")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(base(), out).eval()
    with torch.no_grad():
        close(theirs(X), expected)
        theirs = theirs.merge_and_unload()
        close(theirs(X), expected)


def test_save_peft_name_collisions_keep_their_ranks(tmp_path):
    """conv1 (rank 4) and block.conv1 (rank 2): PEFT's suffix matching must not mix them up."""
    model = wrapped()
    out = peftlite.save(model, tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(base(), out)
    layers = theirs.base_model.model
    assert layers.conv1.r["default"] == 4 and layers.block["conv1"].r["default"] == 2
    assert layers.conv1.scaling["default"] == pytest.approx(2.0)
    assert layers.block["conv1"].scaling["default"] == pytest.approx(1.5)
    assert not hasattr(layers.mlp[1], "r")


def test_peft_round_trip_and_dtype(tmp_path):
    model = wrapped()
    with torch.no_grad():
        expected = model(X)
    peftlite.save(model, tmp_path / "out", format="peft")
    close(peftlite.load(base(), tmp_path / "out")(X), expected)
    peftlite.save(model, tmp_path / "half", format="peft", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "half" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_save_peft_replaces_existing_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    model = wrapped()
    peftlite.save(model, tmp_path / "out", format="peft")
    peftlite.save(model, tmp_path / "out", format="peft")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".peftlite")] == []


# ---- what is refused ------------------------------------------------------------------------------

def test_refuses_pickle(tmp_path):
    path, _ = peft_dir(tmp_path, "list")
    os.rename(path / "adapter_model.safetensors", path / "adapter_model.bin")
    model = base()
    with pytest.raises(AdapterFileError, match="pickle"):
        peftlite.load(model, path)
    assert not any(".lora." in k for k in model.state_dict())


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, words", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias='all'"),
    ({"r": 3}, "rank 4"),
])
def test_refuses_unsupported_configs_and_leaves_model(tmp_path, change, words):
    path, _ = peft_dir(tmp_path, "list")
    _edit_config(path, **change)
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftFormatError, match=words):
        peftlite.load(model, path)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert "_peftlite" not in model.__dict__


def test_loads_real_dora_file_and_refuses_a_config_that_contradicts_its_tensors(tmp_path):
    model = get_peft_model(base(), LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "dora")
    ours = peftlite.load(base(), tmp_path / "dora")  # DoRA is read now (tests/formats/test_variants.py)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), model.eval()(X), rtol=1e-5, atol=1e-6)
    _edit_config(tmp_path / "dora", use_dora=False)
    with pytest.raises(PeftFormatError, match="has a DoRA lora_magnitude_vector while use_dora is False"):
        peftlite.load(base(), tmp_path / "dora")


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd")
def test_refuses_peft_grouped_conv(tmp_path):
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, x):
            return self.dw(x)

    model = get_peft_model(Grouped(), LoraConfig(r=4, target_modules=["dw"]))
    model.save_pretrained(tmp_path / "g")
    with pytest.raises(PeftFormatError, match="grouped"):
        peftlite.load(Grouped(), tmp_path / "g")


def test_refuses_shape_mismatch_and_missing_layers(tmp_path):
    path, _ = peft_dir(tmp_path, "modules_to_save")
    with pytest.raises(ValueError, match="fc"):
        peftlite.load(base(classes=3), path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 5)

    with pytest.raises(PeftFormatError, match="does not have"):
        peftlite.load(Other(), path)


@pytest.mark.parametrize("make, words", [
    (lambda m: peftlite.wrap(m, "block.0", rank=2, train_bn=True), "BatchNorm"),
    (lambda m: peftlite.wrap(m, "conv1", rank=2, trainable=["conv1"]), "inside"),
])
def test_save_refuses_what_peft_cannot_express(tmp_path, make, words):
    model = base()
    model.block["bn"] = nn.BatchNorm2d(8)
    make(model)
    with pytest.raises(PeftFormatError, match=words):
        peftlite.save(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("conv, words", [
    (nn.Conv2d(4, 8, 3, groups=2), "grouped"),
    (nn.Conv2d(4, 8, 3, dilation=2), "dilation"),
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_save_refuses_convs_peft_computes_wrongly(tmp_path, conv, words):
    model = nn.Sequential(conv)
    peftlite.wrap(model, "0", rank=2)
    with pytest.raises(PeftFormatError, match=words):
        peftlite.save(model, tmp_path / "out", format="peft")


def test_save_refuses_multihead_attention(tmp_path):
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    peftlite.wrap(model, "0", rank=2)
    with pytest.raises(PeftFormatError, match="MultiheadAttention"):
        peftlite.save(model, tmp_path / "out", format="peft")


def test_save_bad_format_and_path(tmp_path):
    model = wrapped()
    with pytest.raises(ValueError, match="format"):
        peftlite.save(model, tmp_path / "x", format="hf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        peftlite.save(model, tmp_path / "file", format="peft")
    with pytest.raises(FileNotFoundError):
        peftlite.save(model, tmp_path / "no" / "dir", format="peft")


def test_save_refuses_layers_whose_parent_reads_the_weight(tmp_path):
    class Reader(nn.Module):  # like torchvision's Swin attention: F.linear(x, self.qkv.weight)
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 4)
            self.out = nn.Linear(4, 4)

        def forward(self, x):
            return self.out(torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias))

    model = nn.Sequential(Reader())
    peftlite.wrap(model, "0.out", rank=2)
    peftlite.save(model, tmp_path / "ok", format="peft")  # out is called, so PEFT applies its adapter
    model = nn.Sequential(Reader())
    peftlite.wrap(model, "0.qkv", rank=2)
    with pytest.raises(PeftFormatError, match="reads qkv.weight directly"):
        peftlite.save(model, tmp_path / "bad", format="peft")
    assert not (tmp_path / "bad").exists()


def test_save_refuses_swin_qkv(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(num_classes=3)
    peftlite.wrap(model, "*.attn.qkv", rank=2)
    with pytest.raises(PeftFormatError, match="ShiftedWindowAttention.forward reads qkv.weight"):
        peftlite.save(model, tmp_path / "swin", format="peft")


# ---- parents that read a weight: metadata is fine, values are refused ----------------------------

def assert_peft_reproduces(tmp_path, make, forward, targets) -> None:
    """Wrap ``targets`` of ``make()``, save in PEFT format (not refused), and check PEFT computes the same."""
    model = make()
    peftlite.wrap(model, targets, rank=2)
    randomise(model, ".lora.")
    model.eval()
    with torch.no_grad():
        expected = forward(model)
        assert not torch.allclose(expected, forward(make()))  # the adapters do change the output
    out = peftlite.save(model, tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(make(), out).eval()
    ours = sum(".lora." in n and n.endswith(".A") for n, _ in model.named_parameters())
    assert sum(hasattr(m, "lora_A") for m in theirs.modules()) == ours > 0  # PEFT adapted every layer
    with torch.no_grad():
        close(forward(theirs), expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' notice of a renamed method that peft calls
@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])  # T5DenseActDense, T5DenseGatedActDense: wo.weight.dtype
def test_save_peft_t5_reads_only_the_dtype(tmp_path, ff):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=100,
                                   feed_forward_proj=ff)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))

    def make():
        torch.manual_seed(0)
        return transformers.T5Model(config).eval()

    assert_peft_reproduces(tmp_path, make, lambda m: m(input_ids=ids, decoder_input_ids=ids).last_hidden_state,
                           nn.Linear)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", ["clip", "dinov2"])  # patch_embedding / projection .weight.dtype
def test_save_peft_vision_transformers_read_only_the_dtype(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)
    config, cls = {"clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
                   "dinov2": (transformers.Dinov2Config, transformers.Dinov2Model)}[family]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def make():
        torch.manual_seed(0)
        return cls(config(**dims)).eval()

    convs = [m for m in make().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].groups == 1 and convs[0].dilation == (1, 1)  # PEFT-exact geometry
    assert_peft_reproduces(tmp_path, make, lambda m: m(pixel_values=pixels).last_hidden_state,
                           [nn.Linear, nn.Conv2d])


TIMM = {  # variant: (image size, its attention class); both call F.linear(x, weight=self.qkv.weight, bias=...)
    "eva02_tiny_patch14_224": (28, "EvaAttention"),
    "beit_base_patch16_224": (32, "Attention"),
}


def timm_model(variant: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(variant, pretrained=False, img_size=TIMM[variant][0], embed_dim=32, depth=2,
                             num_heads=2, num_classes=3).eval()


@pytest.mark.parametrize("variant", list(TIMM))
def test_save_refuses_timm_fused_qkv(tmp_path, variant):
    model = timm_model(variant)
    assert model.blocks[0].attn.q_bias is not None  # q/v biases apart: the branch that reads qkv.weight
    peftlite.wrap(model, "*.attn.qkv", rank=2)
    words = rf"save: {TIMM[variant][1]}\.forward reads qkv\.weight directly.* blocks\.0\.attn\.qkv"
    with pytest.raises(PeftFormatError, match=words):
        peftlite.save(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", list(TIMM))
def test_save_peft_timm_without_qkv(tmp_path, variant):
    """Every other Linear/Conv2d of the same model is called, so PEFT reproduces it."""
    size = TIMM[variant][0]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    assert_peft_reproduces(tmp_path, lambda: timm_model(variant), lambda m: m(pixels),
                           lambda n, m: isinstance(m, (nn.Linear, nn.Conv2d)) and not n.endswith("qkv"))


class Holder(nn.Module):
    """A parent of ``wo`` and of ``a.b``; the classes below differ only in how their forward uses them."""

    def __init__(self):
        super().__init__()
        self.wo = nn.Linear(4, 4)
        self.a = nn.Module()
        self.a.b = nn.Linear(4, 4)


def _dtype(self, x):
    return self.wo(x.to(self.wo.weight.dtype))


def _shape(self, x):
    return self.wo(x[..., :self.wo.weight.shape[1]]).view(-1, self.wo.weight.size(0), self.wo.weight.ndim)


def _isinstance(self, x):
    if isinstance(self.wo.weight, torch.Tensor) and x.device != self.wo.weight.device:
        x = x.to(self.wo.weight.device)
    return self.wo(x)


def _is_none(self, x):
    return x if self.wo.weight is None else self.wo(x)


def _linear(self, x):
    return F.linear(x, self.wo.weight, self.wo.bias)


def _transposed(self, x):
    return x @ self.wo.weight.t()


def _aliased(self, x):
    w = self.wo.weight
    return x @ w.T


def _nested(self, x):
    return self.wo(F.linear(x, self.a.b.weight.to(x.dtype)))


@pytest.mark.parametrize("forward, relative, expected", [
    (_dtype, "wo", False),
    (_shape, "wo", False),
    (_isinstance, "wo", False),
    (_is_none, "wo", False),
    (_linear, "wo", True),
    (_transposed, "wo", True),
    (_aliased, "wo", True),
    (_nested, "a.b", True),
    (_nested, "wo", False),
    (_nested, "b", False),  # Holder reads self.a.b.weight, not a self.b.weight of its own
])
def test_reads_values_from_source(forward, relative, expected):
    cls = type(forward.__name__.strip("_").title(), (Holder,), {"forward": forward})
    assert _direct_reads._source_reads(cls) is not None  # the answer comes from the parsed source
    assert _direct_reads.reads_values(cls, relative) is expected


def _no_source(body: str, decorate: bool = False) -> type:
    """A Holder whose forward is compiled from a string, so ``inspect`` finds no source for it."""
    scope = {"F": F, "torch": torch}
    exec(compile(f"def forward(self, x):\n    return {body}\n", "<generated>", "exec"), scope)
    forward = scope["forward"]
    if decorate:  # as a logging or checkpointing decorator would: only the wrapped code reads the weight
        forward = functools.wraps(forward)(lambda *args, **kwargs: scope["forward"](*args, **kwargs))
    return type("Generated", (Holder,), {"forward": forward})


@pytest.mark.parametrize("body, relative, expected", [
    ("self.wo(x.to(self.wo.weight.dtype))", "wo", False),
    ("self.wo(x).view(-1, self.wo.weight.size(0), self.wo.weight.shape[0])", "wo", False),
    ("F.linear(x, self.wo.weight)", "wo", True),
    ("x @ self.wo.weight.t()", "wo", True),
    ("F.linear(x, self.a.b.weight)", "a.b", True),
    ("F.linear(x, self.a.b.weight)", "wo", False),
    ("sum(F.linear(v, self.wo.weight) for v in x)", "wo", True),  # a generator is a code object of its own
])
@pytest.mark.parametrize("decorate", [False, True])
def test_reads_values_falls_back_to_bytecode(body, relative, expected, decorate):
    cls = _no_source(body, decorate)
    assert _direct_reads._source_reads(cls) is None  # no source: the answer comes from the bytecode
    assert _direct_reads.reads_values(cls, relative) is expected
