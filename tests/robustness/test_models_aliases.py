"""Aliased modules: one module registered under several names (timm's CoaT shares its position encodings).

``named_modules()`` lists such a module once, under its first name, but ``state_dict()`` lists its tensors
under every name. An adapter is saved once, under the first name (``adapted_layers``), and a fresh model
wraps the module once, so every alias sees the adapter.
"""

import pytest
import torch
from torch import nn

import peftlite
from conftest import randomize_adapters
from peftlite.layers import adapted_layers
from peftlite.state import wrap_state
from peftlite.wrapping import alias_names, saved_tensors, trained_names, under


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), self.first)  # the same Linear as block.1
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(self.first(x)))


def test_an_aliased_layer_is_adapted_saved_and_loaded_once(tmp_path):
    torch.manual_seed(0)
    model = peftlite.wrap(Aliased(), nn.Linear, rank=2)
    randomize_adapters(model, std=0.3)
    assert [n for n, _ in adapted_layers(model)] == ["first", "out"]
    assert "block.1.lora.default.A" in model.state_dict()  # the alias, as torch lists it
    assert sorted(saved_tensors(model, wrap_state(model))) == [
        "first.lora.default.A", "first.lora.default.B", "out.lora.default.A", "out.lora.default.B"]
    path = peftlite.save(model, tmp_path / "a.safetensors")

    torch.manual_seed(0)
    fresh = Aliased()  # the same base weights
    peftlite.load(fresh, path)  # strict
    assert fresh.block[1] is fresh.first and len(adapted_layers(fresh)) == 2
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))

    torch.manual_seed(0)
    again = peftlite.wrap(Aliased(), nn.Linear, rank=2)
    peftlite.load(again, path)  # into a wrapped model
    torch.testing.assert_close(again(x), model(x))
    assert again.load_state_dict(model.state_dict()).missing_keys == []  # every alias key fits
    with torch.no_grad():
        unmerged = model(x)
        peftlite.merge(model)  # once, not once per name
        torch.testing.assert_close(model(x), unmerged)
        peftlite.unwrap(model)
        torch.testing.assert_close(model(x), unmerged)


def test_coat_saves_each_shared_adapter_once_and_loads_strictly(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("coat_lite_tiny", pretrained=False, num_classes=3, img_size=64).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    # serial_blocks1 holds the shared position encodings under other names (cpe1 is the first)
    peftlite.wrap(model, (nn.Linear, nn.Conv2d), rank=2, trainable=["serial_blocks1"])
    randomize_adapters(model, std=0.02)
    layers = adapted_layers(model)
    saved = saved_tensors(model, wrap_state(model))
    aliases = alias_names(model)
    assert "serial_blocks1.0.cpe" in aliases
    assert [k for k in model.state_dict() if under(k, aliases) and ".lora." in k]  # torch lists them again
    assert not [k for k in saved if under(k, aliases)]
    assert set(saved) == trained_names(model, wrap_state(model))  # each trained tensor once, nothing else
    path = peftlite.save(model, tmp_path / "coat.safetensors")

    fresh = timm.create_model("coat_lite_tiny", pretrained=False, num_classes=3, img_size=64).eval()
    fresh.load_state_dict(base)
    peftlite.load(fresh, path)
    assert len(adapted_layers(fresh)) == len(layers)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
