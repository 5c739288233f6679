"""Tied weights: an adapted Linear whose weight another module shares (GPT-2, T5, BERT-MLM heads).

Unmerged, the head adds its adapter and the embedding keeps W. ``merge`` refuses (it would change the
embedding too) unless ``untie=True``, which merges into a copy of the head's own; ``unmerge`` ties again.
"""

import pytest
import torch
from torch import nn

import peftlite
from conftest import assert_unchanged, bits_equal, randomize_adapters, snapshot
from peftlite.layers import registry

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 64


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, bos_token_id=0, eos_token_id=0))


def bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=V,
        max_position_embeddings=16))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, d_model=16, d_kv=8, num_heads=2, d_ff=32, vocab_size=V, decoder_start_token_id=0))


MODELS = {"gpt2": (gpt2, "lm_head", "transformer.wte.weight"),
          "bert": (bert, "cls.predictions.decoder", "bert.embeddings.word_embeddings.weight"),
          "t5": (t5, "lm_head", "shared.weight")}


def build(family):
    torch.manual_seed(0)
    factory, head, embedding = MODELS[family]
    model = factory().eval()
    peftlite.wrap(model, nn.Linear, rank=2)
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    extra = {"decoder_input_ids": ids[:, :4]} if family == "t5" else {}
    run = lambda: model(input_ids=ids, **extra).logits  # noqa: E731
    return model, head, embedding, run


def tied(model, head):
    return model.get_submodule(head)._parameters["weight"] is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", list(MODELS))
def test_merge_refuses_a_tied_head_and_merges_it_untied_on_request(family):
    model, head, embedding, run = build(family)
    assert tied(model, head)
    with torch.no_grad():
        unmerged = run()
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf"cannot merge {head}: {head}.weight is shared with {embedding}"):
            peftlite.merge(model)
        assert_unchanged(model, before)
        assert not any(m.adapter_state.merged for _, m in peftlite.layers.adapted_layers(model))

        embedding_before = model.get_input_embeddings().weight.clone()
        peftlite.merge(model, untie=True)
        assert not tied(model, head)
        assert bits_equal(model.get_input_embeddings().weight, embedding_before)  # the embedding keeps W
        torch.testing.assert_close(run(), unmerged, rtol=1e-4, atol=1e-5)
        state = model.state_dict()  # the merged head under its key, the base embedding under its own
        assert not bits_equal(state[f"{head}.weight"], state[embedding])

        peftlite.unmerge(model)
        assert tied(model, head)
        assert_unchanged(model, before)
        assert torch.equal(run(), unmerged)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_unwrap_merge_refuses_a_tied_head_unless_untied(family):
    model, head, embedding, run = build(family)
    with torch.no_grad():
        unmerged = run()
        with pytest.raises(ValueError, match=r"peftlite.unwrap\(model, untie=True\)"):
            peftlite.unwrap(model)
        assert peftlite.state.wrap_state(model) is not None and tied(model, head)
        embedding_before = model.get_input_embeddings().weight.clone()
        peftlite.unwrap(model, untie=True)
        assert type(model.get_submodule(head)) is nn.Linear and not tied(model, head)
        assert bits_equal(model.get_input_embeddings().weight, embedding_before)
        torch.testing.assert_close(run(), unmerged, rtol=1e-4, atol=1e-5)


def test_unwrap_without_merge_after_an_untied_merge_ties_again():
    model, head, _, run = build("gpt2")
    with torch.no_grad():
        base = model.get_input_embeddings().weight.clone()
        peftlite.merge(model, untie=True)
        peftlite.unwrap(model, merge=False)
    assert tied(model, head) and bits_equal(model.lm_head.weight, base)


def test_disabled_keeps_an_untied_merge_untied():
    model, head, _, run = build("gpt2")
    with torch.no_grad():
        unmerged = run()
        peftlite.merge(model, untie=True)
        with peftlite.disabled(model):
            assert bits_equal(model.lm_head.weight, model.get_input_embeddings().weight)
        assert not tied(model, head)
        torch.testing.assert_close(run(), unmerged, rtol=1e-4, atol=1e-5)


class TwoHeads(nn.Module):
    """Two Linear layers that share one weight tensor, and a third that views part of it."""

    def __init__(self, view: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 2, bias=False)
        if view:
            self.c.weight = nn.Parameter(self.a.weight.detach()[:2])  # another Parameter, the same storage

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], -1)


def test_two_adapted_layers_sharing_a_weight():
    torch.manual_seed(0)
    model = peftlite.wrap(TwoHeads(), ["a", "b"], rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(3, 4)
    with torch.no_grad():
        unmerged = model(x)
        with pytest.raises(ValueError, match="a.weight is shared with b.weight"):
            peftlite.merge(model)
        peftlite.merge(model, untie=True)
        torch.testing.assert_close(model(x), unmerged)
        peftlite.unmerge(model)
        assert model.a._parameters["weight"] is model.b._parameters["weight"]
        assert torch.equal(model(x), unmerged)


def test_storage_overlap_counts_as_shared_and_disjoint_views_do_not():
    model = peftlite.wrap(TwoHeads(view=True), ["c"], rank=2)
    layers = peftlite.layers.adapted_layers(model)
    assert registry.shared_weights(model, layers) == {("c", "weight"): ["a.weight", "b.weight"]}
    whole = torch.zeros(8, 4)
    model = nn.ModuleDict({"lin": nn.Linear(4, 4), "other": nn.Linear(4, 4)})
    model.lin.weight = nn.Parameter(whole[:4])  # two halves of one storage: disjoint, so not shared
    model.other.weight = nn.Parameter(whole[4:])
    peftlite.wrap(model, ["lin", "other"], rank=2)
    assert registry.shared_weights(model, peftlite.layers.adapted_layers(model)) == {}
    peftlite.merge(model)  # each merges into its own half


def test_an_aliased_module_is_not_a_tie():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("again", model[0])
    peftlite.wrap(model, "0", rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        unmerged = model(x)
        peftlite.merge(model)
        torch.testing.assert_close(model(x), unmerged)
