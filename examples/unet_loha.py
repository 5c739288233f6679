"""A LyCORIS LoHa file on a diffusers UNet: load it with peftlite, check its outputs, merge, unmerge bit-exactly.

Offline and in seconds: the UNet is a tiny one built from a config (random weights, nothing downloaded),
and the LoHa file is written by the lycoris package itself (``create_lycoris``), on every Linear and Conv2d,
3x3 convs in LyCORIS's Tucker form (``use_tucker=True``).

    pip install -e ".[lycoris]"
    python examples/unet_loha.py
"""

import copy
import logging
import os
import tempfile

import torch
from diffusers import UNet2DConditionModel
from lycoris import create_lycoris
from lycoris.logging import logger

import peftlite

logger.setLevel(logging.ERROR)
torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
).eval()
sample, steps, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)


def denoise(model):
    with torch.no_grad():
        return model(sample, steps, text).sample


# 1. A LoHa adapter made and saved by LyCORIS (on a copy: LyCORIS patches the modules' forwards).
theirs = copy.deepcopy(unet)
network = create_lycoris(theirs, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo="loha",
                         use_tucker=True)
network.apply_to()
with torch.no_grad():  # as if trained: LyCORIS starts hada_w2_a at zero, so the adapter would do nothing
    for p in network.parameters():
        p.normal_(0, 0.5)
expected = denoise(theirs)
folder = tempfile.mkdtemp()
path = os.path.join(folder, "unet_loha.safetensors")
network.save_weights(path, None, None)
print(f"LyCORIS wrote {len(network.loras)} LoHa entries to {path}")

# 2. The same file into the UNet with peftlite (told apart by its keys; Tucker cores contracted on reading).
base = {k: v.clone() for k, v in unet.state_dict().items()}
peftlite.load(unet, path)
out = denoise(unet)
error = (out - expected).abs().max().item()
print(f"outputs: peftlite vs LyCORIS, max |difference| = {error:.2e} (outputs up to {expected.abs().max():.2f})")
assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), error

# 3. Merge: zero overhead, the same outputs up to fp32 rounding.
peftlite.merge(unet)
merged = denoise(unet)
print(f"merged: max |difference| to unmerged = {(merged - out).abs().max().item():.2e}")
assert torch.allclose(merged, out, rtol=1e-5, atol=1e-5)

# 4. Unmerge: every base weight back, bit for bit.
peftlite.unmerge(unet)
now = unet.state_dict()
exact = all(torch.equal(now[k], v) for k, v in base.items())
print(f"unmerged: all {len(base)} base tensors bit-exact (torch.equal): {exact}")
assert exact
assert torch.equal(denoise(unet), out)
print("ok")
