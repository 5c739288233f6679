"""A wrapped model trains under autocast and with activation checkpointing; adapters keep fp32 masters."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.vision_transformer import VisionTransformer

import peftlite
from peftlite.demo.digits import tiny_resnet


def _resnet():
    torch.manual_seed(0)
    return peftlite.wrap(tiny_resnet(5), ["layer2.*", "layer3.*"], rank=4, heads={"fc": nn.Linear(64, 5)})


def _resnet_forward(m, x, ckpt: bool):
    x = m.relu(m.bn1(m.conv1(x)))
    for stage in (m.layer1, m.layer2, m.layer3):
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
    return m.fc(torch.flatten(m.avgpool(x), 1))


def _vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=5)
    return peftlite.wrap(model, "encoder.layers.*", rank=4, dropout=0.1,
                         heads={"heads.head": nn.Linear(32, 5)})


def _vit_forward(m, x, ckpt: bool):
    x = m._process_input(x)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    enc = m.encoder
    x = enc.dropout(x + enc.pos_embedding)
    for layer in enc.layers:
        x = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
    return m.heads(enc.ln(x)[:, 0])


def _grads(model, forward, x, y, ckpt, autocast):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs (checkpoint replays the RNG state)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = F.cross_entropy(forward(model, x, ckpt), y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("build, forward, shape", [(_resnet, _resnet_forward, (8, 1, 16, 16)),
                                                   (_vit, _vit_forward, (4, 3, 32, 32))],
                         ids=["resnet", "vit"])
def test_checkpointed_gradients_equal_plain_ones(build, forward, shape, autocast):
    model = build()
    x, y = torch.randn(*shape), torch.randint(0, 5, (shape[0],))
    plain = _grads(model, forward, x, y, False, autocast)
    ckpt = _grads(model, forward, x, y, True, autocast)
    assert plain.keys() == ckpt.keys() and any(".lora." in k for k in plain)
    for name in plain:
        assert plain[name].dtype == torch.float32, name  # fp32 masters get fp32 gradients
        assert torch.isfinite(plain[name]).all(), name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(forward(model.eval(), x, True), forward(model, x, False), rtol=0, atol=0)


def test_bf16_autocast_training_keeps_fp32_adapters_and_learns():
    model = _resnet()
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 5, (32,))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}
    losses = []
    model.train()
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in lora:
            assert p.dtype == torch.float32 and not torch.equal(p, lora[name]), name


def test_bf16_base_model_gets_fp32_adapters_and_grads():
    torch.manual_seed(0)
    model = peftlite.wrap(tiny_resnet(5).to(torch.bfloat16), "layer3.*", rank=4)
    a = model.layer3[0].conv1.lora.default.A
    assert model.layer3[0].conv1.weight.dtype == torch.bfloat16 and a.dtype == torch.float32
    model(torch.randn(4, 1, 16, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for fp16 autocast with GradScaler")
def test_cuda_fp16_autocast_with_grad_scaler():
    model = _resnet().cuda()
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(32, 1, 16, 16, device="cuda"), torch.randint(0, 5, (32,), device="cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}
    losses = []
    model.train()
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(_resnet_forward(model, x, True), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in before:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert not torch.equal(p, before[name]), name
