"""The invariant matrix: toy and real torchvision models (random init) x the properties every wrap keeps."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from conftest import randomize_adapters
from peftlite.layers import AdaptedLayer


class Toy(nn.Module):
    """Conv, grouped conv, depthwise dilated reflect conv, BN, Linear: the shapes the zoo has."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.group = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, padding_mode="reflect")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.dw(self.group(x))
        return self.head(x.mean((2, 3)))


def tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


MODELS = {
    "toy": (Toy, 16, (nn.Conv2d, nn.Linear)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 32, nn.Conv2d),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 32, (nn.Conv2d, nn.Linear)),
    "shufflenet": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=5), 32, nn.Conv2d),
    "vit": (tiny_vit, 32, (nn.MultiheadAttention, nn.Linear)),
}

# relative tolerance of merged vs unmerged outputs, per dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
KINDS = ("lora", "loha", "lokr")  # AdapterSpec.kind: every invariant holds for each


def build(name, dtype=torch.float32):
    make, size, targets = MODELS[name]
    torch.manual_seed(0)
    model = make().eval().to(dtype)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    return model, x, targets


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_init_output_equals_base(name, kind):
    model, x, targets = build(name)
    with torch.no_grad():
        base = model(x)
        peftlite.wrap(model, targets, rank=4, kind=kind)
        assert torch.equal(model(x), base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_merge_unmerge_unwrap(name, dtype, kind):
    model, x, targets = build(name, dtype)
    peftlite.wrap(model, targets, rank=4, kind=kind)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(x)
        peftlite.merge(model)
        merged = model(x)
        assert rel_err(merged, adapted) < TOL[dtype]
        for _ in range(2):  # many cycles: test_merge_state, test_kernels
            peftlite.unmerge(model)
            peftlite.merge(model)
        peftlite.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored bit-exactly"
    plain = peftlite.unwrap(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, AdaptedLayer) or "peftlite" in type(m).__module__ for m in plain.modules())
    with torch.no_grad():
        assert rel_err(plain(x), adapted) < TOL[dtype]


@pytest.mark.parametrize("name", MODELS)
def test_unwrap_keys_and_classes(name):
    model, x, targets = build(name)
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    peftlite.wrap(model, targets, rank=2)
    assert all(k in model.state_dict() for k in keys)  # wrap only adds keys
    peftlite.unwrap(model, merge=False)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_save_load_into_fresh_base(name, kind, tmp_path):
    model, x, targets = build(name)
    fresh = copy.deepcopy(model)
    peftlite.wrap(model, targets, rank=4, kind=kind)
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(x)
    path = peftlite.save(model, tmp_path / "a.safetensors")
    peftlite.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_training_step_changes_only_adapters_and_heads(name, kind):
    model, x, targets = build(name)
    peftlite.wrap(model, targets, rank=4, kind=kind)
    randomize_adapters(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-30)  # scale-free
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(".lora." in k for k in changed), sorted(k for k in changed if ".lora." not in k)
