"""Files of a PiSSA / OLoRA adapter apply to the ORIGINAL base: a plain LoRA of rank 2r, loaded by peftlite and by
PEFT into the unmodified model with the trained model's outputs."""

import copy
import json

import pytest
import torch
from torch import nn

import peftlite
from peftlite.formats.native import read


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 5 * 5, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.conv(x)).flatten(1)))


def _trained(init, rank_scaling="linear"):
    torch.manual_seed(0)
    base = Net()
    m = peftlite.wrap(copy.deepcopy(base), ["conv", "fc", "out"], rank=2, alpha=4, init=init, rank_scaling=rank_scaling)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return base, m, torch.randn(3, 4, 5, 5, generator=g)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_native_file_is_a_plain_lora_on_the_original_weights(tmp_path, init):
    base, m, x = _trained(init)
    y = m(x)
    path = peftlite.save(m, tmp_path / "a.safetensors")
    tensors, config = read(path)
    assert config["init"] == init and config["layers"]["fc"]["init"] == init
    assert config["layers"]["fc"]["rank"] == 4 and config["layers"]["fc"]["alpha"] == 8.0  # r × 2, alpha × 2
    assert tensors["fc.lora.default.A"].shape == (4, 200) and "fc.lora.default.A0" not in tensors
    fresh = copy.deepcopy(base)
    peftlite.load(fresh, path)
    torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)
    # into the PiSSA-wrapped model under another name: computed on the original weights, the same outputs
    peftlite.load(m, path, name="shared")
    peftlite.use(m, "shared")
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="started from a .* init"):
        peftlite.load(m, path, name="default")


@pytest.mark.parametrize("init, rank_scaling", [("pissa", "linear"), ("olora", "sqrt"), ("pissa_niter_2", "linear")])
def test_peft_directory_loads_into_the_unmodified_model(tmp_path, init, rank_scaling):
    peft = pytest.importorskip("peft")
    base, m, x = _trained(init, rank_scaling)
    y = m(x)
    peftlite.save(m, tmp_path / "p", format="peft")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8.0 if rank_scaling == "linear" else 4 * 2 ** 0.5)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    again = copy.deepcopy(base)
    peftlite.load(again, tmp_path / "p")
    torch.testing.assert_close(again(x), y, atol=1e-5, rtol=1e-5)


def test_hotswap_into_the_principal_adapter_refused(tmp_path):
    base, m, x = _trained("pissa")
    path = peftlite.save(m, tmp_path / "a.safetensors")
    peftlite.prepare_hotswap(m, max_rank=8)
    with pytest.raises(ValueError, match="started from a pissa init"):
        peftlite.hotswap(m, path, name="default")


def test_lycoris_file_is_the_plain_lora_too(tmp_path):
    base, m, x = _trained("olora")
    path = peftlite.save(m, tmp_path / "l.safetensors", format="lycoris")
    fresh = copy.deepcopy(base)
    peftlite.load(fresh, path, format="lycoris")
    torch.testing.assert_close(fresh(x), m(x), atol=1e-5, rtol=1e-5)
