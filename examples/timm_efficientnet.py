"""LoRA on a timm model: tf_efficientnet_b0, every Conv2d (depthwise and timm's Conv2dSame included).

    pip install 'peftlite[examples]'
    python examples/timm_efficientnet.py

The model is built with random weights (no download): the point is the mechanics on a real timm
architecture. It has 5 ``Conv2dSame`` layers (a Conv2d subclass with TensorFlow 'same' padding in its
own forward), 16 depthwise convs and timm's ``BatchNormAct2d``. peftlite adapts all of them exactly,
trains a few steps on digits, then checks merged == unmerged, bit-exact unmerge, and save -> load into a
fresh model. Saving it as a PEFT directory is refused, with the reason. About 15 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, digit_split


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=1000).eval()


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    split = digit_split(NEW_CLASSES)
    x_train = F.interpolate(split.x_train, size=32).expand(-1, 3, -1, -1)  # (N, 3, 32, 32)
    x_test = F.interpolate(split.x_test, size=32).expand(-1, 3, -1, -1)

    model = build()
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d)})
    peftlite.wrap(model, nn.Conv2d, rank=4, heads={"classifier": nn.Linear(1280, len(NEW_CLASSES))})
    s = peftlite.summary(model)
    print(f"tf_efficientnet_b0: adapted {sum('lora' in r.type for r in s.rows)} convs ({', '.join(kinds)}); "
          f"trainable {s.trainable:,} of {s.total:,} ({s.percent:.1f}%)")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for step in range(30):
        idx = torch.randint(len(x_train), (32,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), split.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    print(f"30 steps in {time.perf_counter() - start:.1f} s")

    model.eval()
    with torch.no_grad():
        y = model(x_test)
        acc = (y.argmax(1) == split.y_test).float().mean().item()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        peftlite.merge(model)
        rel = ((model(x_test) - y).abs().max() / y.abs().max()).item()
        peftlite.unmerge(model)
    exact = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    print(f"test accuracy after 30 steps from random init: {100 * acc:.1f}%")
    print(f"merged vs unmerged: max relative difference {rel:.1e}; unmerge bit-exact: {exact}")

    out = tempfile.mkdtemp(prefix="peftlite-timm-")
    path = peftlite.save(model, os.path.join(out, "effnet_lora.safetensors"))
    fresh = peftlite.load(build(), path).eval()
    with torch.no_grad():
        same = torch.equal(fresh(x_test), y)
    print(f"adapter {path}: {os.path.getsize(path) / 1024:.0f} KiB; reloaded into a fresh model: "
          f"identical {same}")
    try:
        peftlite.save(model, os.path.join(out, "peft_dir"), format="peft")
    except ValueError as e:
        print(f"as a PEFT directory: refused: {e}")


if __name__ == "__main__":
    main()
