"""The five models of ``benchmarks/lean.py``, each as a ``Case``: the initial model, its batch, its loss,
and what its LoRA contenders adapt.

Every model is random-init (no downloads: timm with ``pretrained=False``, transformers from a config),
built after ``torch.manual_seed(0)``, fp32. ``quick`` shrinks the images / sequence only; the
architectures are the full-size ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Case:
    """One model of the benchmark, shared by all its contenders (each takes a deep copy of ``model``)."""

    name: str
    model: nn.Module  # the initial model, its 10-class head already in place
    x: Tensor  # the batch: images (B, 3, H, W), or token ids (B, T)
    y: Tensor  # labels (B,)
    head: str  # the head's module name: trained in full by every contender that trains
    variants: dict[str, object]  # LoRA contender name -> wrap targets; the first is "lora"
    head_via: str = "heads"  # how wrap trains the head: "heads" (a new module in its place) or "trainable"
    text: bool = False  # token ids in, so the frozen step's gradient goes to the embedding output
    notes: list[str] = field(default_factory=list)

    def wrap_kwargs(self, model: nn.Module) -> dict:
        """The ``heads=`` / ``trainable=`` argument of ``peftlite.wrap`` for a copy of the model."""
        if self.head_via == "heads":
            head = model.get_submodule(self.head)
            fresh = nn.Linear(head.in_features, head.out_features)
            fresh.load_state_dict(head.state_dict())  # the same values as every other contender's head
            return {"heads": {self.head: fresh}}
        return {"trainable": self.head}

    def loss(self, model: nn.Module, input_grad: bool) -> Tensor:
        """Forward and loss of one batch; with ``input_grad`` the gradient flows to the input (for token
        ids: to the word embeddings' output)."""
        if self.text:
            if input_grad:
                embeds = model.bert.embeddings.word_embeddings(self.x).detach().requires_grad_()
                return model(inputs_embeds=embeds, labels=self.y).loss
            return model(input_ids=self.x, labels=self.y).loss
        x = self.x.detach().requires_grad_() if input_grad else self.x
        return F.cross_entropy(model(x), self.y)


def _images(batch: int, px: int, classes: int = 10) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, 3, px, px), torch.randint(0, classes, (batch,))


def resnet50(quick: bool) -> Case:
    from torchvision.models import resnet50
    torch.manual_seed(0)
    m = resnet50()
    m.fc = nn.Linear(2048, 10)
    return Case("resnet50", m, *_images(8, 32 if quick else 128), head="fc", variants={"lora": nn.Conv2d})


def convnext_tiny(quick: bool) -> Case:
    from torchvision.models import convnext_tiny
    torch.manual_seed(0)
    m = convnext_tiny()
    m.classifier[2] = nn.Linear(768, 10)
    return Case("convnext_tiny", m, *_images(8, 32 if quick else 128), head="classifier.2",
                variants={"lora": nn.Conv2d})


def vit_b_16(quick: bool) -> Case:
    from torchvision.models import vit_b_16
    torch.manual_seed(0)
    px = 32 if quick else 224
    m = vit_b_16(image_size=px)
    m.heads.head = nn.Linear(768, 10)
    return Case("vit_b_16", m, *_images(4, px), head="heads.head",
                variants={"lora": [nn.Conv2d, nn.Linear],
                          "lora_attn": [nn.Conv2d, nn.Linear, nn.MultiheadAttention],
                          "lora_mlp": "encoder.layers.*.mlp.*"},
                notes=["lora: every Conv2d and Linear (out_proj included, the MHA's in_proj not); lora_attn: "
                       "also every nn.MultiheadAttention (its packed q/k/v projection); lora_mlp: the MLP "
                       "Linears only"])


def timm_vit(quick: bool) -> Case:
    import timm
    torch.manual_seed(0)
    px = 32 if quick else 224
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=px)
    return Case("timm_vit", m, *_images(4, px), head="head", head_via="trainable",
                variants={"lora": lambda name, mod: isinstance(mod, nn.Linear) and name != "head"},
                notes=["lora: qkv, proj, fc1, fc2 of every block (every Linear but the head)"])


def bert(quick: bool) -> Case:
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig()
    m = transformers.BertForSequenceClassification(config)
    seq = 16 if quick else 128
    x = torch.randint(0, config.vocab_size, (4, seq))
    y = torch.randint(0, config.num_labels, (4,))
    return Case("bert", m, x, y, head="classifier", head_via="trainable", text=True,
                variants={"lora": ["query", "value"], "lora_all": "bert.encoder"},
                notes=["lora: query and value; lora_all: every Linear of the encoder; the frozen step's gradient "
                       "flows to the word embeddings' output (inputs_embeds)"])


CASES: dict[str, Callable[[bool], Case]] = {
    "resnet50": resnet50, "convnext_tiny": convnext_tiny, "vit_b_16": vit_b_16, "timm_vit": timm_vit, "bert": bert,
}
