"""Every torchvision classification architecture, random init, every Conv2d and Linear adapted.

For each model (num_classes=10, rank 4, non-zero adapters), as plain LoRA, DoRA, LoHa and LoKr, this checks that:
1. every adapter tensor receives a non-zero gradient (no adapter is silently bypassed);
2. merged == unmerged within a relative error of 1e-4 of the output's scale;
3. unmerge restores every state_dict tensor bit-exactly;
4. unwrap leaves no peftlite module and the original state_dict keys.

LoHa and LoKr run on one model of each family (``FAMILIES``: every building block the zoo has), all of them
with ``PEFTLITE_ZOO=all``. The huge models are skipped by name (with the reason) unless ``PEFTLITE_ZOO=all``:

    PEFTLITE_ZOO=all PYTHONPATH=src python -m pytest -q tests/test_zoo.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

import peftlite

ALL = torchvision.models.list_models(module=torchvision.models)

# Over 100 M parameters: too slow or too big for a 2-core CI; they run with PEFTLITE_ZOO=all. (vgg11 and
# vgg11_bn, also over 100 M, stay in CI to cover the VGG family.) Every one of them passes.
HUGE = {
    "regnet_y_128gf": "645 M params, 25 s", "vit_h_14": "632 M params, 15 s", "vit_l_16": "304 M params",
    "vit_l_32": "306 M params", "convnext_large": "198 M params", "regnet_y_32gf": "145 M params",
    "vgg19_bn": "144 M params", "vgg19": "144 M params", "vgg16_bn": "138 M params", "vgg16": "138 M params",
    "vgg13_bn": "133 M params", "vgg13": "133 M params", "wide_resnet101_2": "127 M params",
    "efficientnet_v2_l": "118 M params", "regnet_x_32gf": "108 M params",
}

# Input side per family: the smallest the architecture takes (ViT is built for its image size; MaxViT
# needs 224; Inception's auxiliary head, which runs in train mode, needs 299).
SIZE = {"maxvit_t": 224, "inception_v3": 299, "googlenet": 75, "alexnet": 64, "swin": 64, "vit": 32}
BUILD = {"vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 32},
         "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 28},
         "inception_v3": {"init_weights": False}, "googlenet": {"init_weights": False}}

RUN_ALL = os.environ.get("PEFTLITE_ZOO", "").lower() == "all"
ADAPTERS = {"lora": {}, "dora": {"variant": "dora"}, "loha": {"kind": "loha"}, "lokr": {"kind": "lokr"}}


def _size(name: str) -> int:
    if name in SIZE:
        return SIZE[name]
    family = name.split("_")[0]
    if family == "vit":
        return BUILD[name]["image_size"]
    return SIZE.get(family, 32)


# One model per family, for the adapter kinds whose ΔW the LoRA runs already cover layer type by layer type.
FAMILIES = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t",
            "swin_v2_t", "vgg11_bn", "vit_b_16")
KINDS_EVERYWHERE = ("lora", "dora")  # the others run on FAMILIES


def _params() -> list:
    out = []
    for name in ALL:
        for adapter in ADAPTERS:
            marks = []
            if name in HUGE and not RUN_ALL:
                marks.append(pytest.mark.skip(reason=f"{name}: {HUGE[name]}; run with PEFTLITE_ZOO=all"))
            elif adapter not in KINDS_EVERYWHERE and name not in FAMILIES and not RUN_ALL:
                continue
            out.append(pytest.param(name, adapter, id=f"{name}-{adapter}", marks=marks))
    return out


def _logits(out) -> list[torch.Tensor]:
    """Every output tensor (Inception/GoogLeNet return their auxiliary logits too in train mode)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _reinit_zero_weights(model: nn.Module) -> None:
    """A random-init ViT has an all-zero head, which would zero every gradient behind it."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _no_stochastic_layers(model: nn.Module) -> None:
    """Train mode for the gradient pass (aux heads run), but no dropout or stochastic depth."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.eval()


def test_zoo_list_is_complete():
    assert len(ALL) >= 80
    assert len([n for n in ALL if n not in HUGE]) >= 63


UP = (".B", ".B1", ".B2", ".W1")  # the factors that start at zero (or small): randomised so ΔW is not zero


@pytest.mark.parametrize(("name", "adapter"), _params())
def test_zoo_architecture(name, adapter):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **BUILD.get(name, {}))
    _reinit_zero_weights(model)
    original_keys = list(model.state_dict())
    size = _size(name)
    x = torch.randn(1, 3, size, size)  # frozen BatchNorm: batch 1 works in train mode too

    peftlite.wrap(model, (nn.Conv2d, nn.Linear), rank=4, **ADAPTERS[adapter])
    adapters = {n: p for n, p in model.named_parameters() if ".lora." in f".{n}"}
    assert adapters, name
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in adapters.items():
            if n.endswith(UP):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if n.endswith(".magnitude"):  # DoRA: away from ‖W‖, so the magnitude matters too
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    assert all(p.requires_grad for p in adapters.values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(adapters)

    # 1. every adapter tensor gets a gradient
    model.train()
    _no_stochastic_layers(model)
    loss = 0.0
    for out in _logits(model(x)):
        weights = torch.randn(out.shape, generator=g)
        loss = loss + (out * weights).sum()
    loss.backward()
    dead = [n for n, p in adapters.items() if p.grad is None or not bool(p.grad.ne(0).any())]
    assert not dead, f"{name}: {len(dead)} of {len(adapters)} adapter tensors got no gradient: {dead[:5]}"
    model.zero_grad(set_to_none=True)

    # 2. merged == unmerged
    model.eval()
    with torch.no_grad():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        unmerged = model(x)
        peftlite.merge(model)
        merged = model(x)
        scale = unmerged.abs().max().item()
        assert torch.isfinite(unmerged).all() and scale > 0
        rel = (merged - unmerged).abs().max().item() / scale
        assert rel <= 1e-4, f"{name}: merged differs from unmerged by {rel:.2e} of the output's scale"

        # 3. unmerge is bit-exact
        peftlite.unmerge(model)
        after = model.state_dict()
        assert list(after) == list(before)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{name}: unmerge changed {changed[:5]}"

    # 4. unwrap leaves plain torch modules
    peftlite.unwrap(model, merge=True)
    left = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
            if type(m).__module__.startswith("peftlite")]
    assert not left, f"{name}: peftlite modules left after unwrap: {left[:5]}"
    assert list(model.state_dict()) == original_keys
