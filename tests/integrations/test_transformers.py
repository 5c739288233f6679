"""AdapterTrainer: checkpoints and the final save hold the adapter file only, and a resume restores it."""

import os

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging  # noqa: E402

import peftlite  # noqa: E402
from peftlite.formats.native import read  # noqa: E402
from peftlite.integrations.transformers import ADAPTER_FILE, AdapterTrainer  # noqa: E402

TARGETS = ["*.attention.self.query", "*.attention.self.value"]
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


class Tokens(torch.utils.data.Dataset):
    """Random token ids with a label that depends on them (token 0 < 50), so the loss can fall."""

    def __init__(self, n: int = 32, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, length), generator=g)
        self.labels = (self.ids[:, 0] < 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class StopAt(TrainerCallback):
    """Interrupt training after ``step`` steps (the checkpoint due at that step is still written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def tiny_bert() -> BertForSequenceClassification:
    """The same base weights on every call, wrapped: LoRA on query/value, the classifier trained in full."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    return peftlite.wrap(model, TARGETS, rank=4, alpha=8, trainable=["classifier"])


def arguments(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps")
    return TrainingArguments(**(base | kw))


@pytest.fixture(autouse=True)
def quiet():
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(before)


def saved(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora." in k or "classifier" in k}


def assert_adapter_only(folder, base_bytes: int):
    files = set(os.listdir(folder))
    adapter = os.path.getsize(os.path.join(folder, ADAPTER_FILE))
    assert ADAPTER_FILE in files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    model_files = files - TRAINER_FILES - {ADAPTER_FILE}
    assert all(os.path.getsize(os.path.join(folder, f)) <= 2 * adapter for f in model_files), model_files
    assert adapter < base_bytes / 4
    assert all(os.path.getsize(os.path.join(folder, f)) < base_bytes / 2 for f in files)  # no base weights anywhere


def test_checkpoints_and_final_save_hold_the_adapter_only(tmp_path):
    model = tiny_bert()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path), train_dataset=Tokens())
    trainer.train()
    trainer.save_model()
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(tmp_path))
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(tmp_path / "checkpoint-2"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        assert_adapter_only(folder, base_bytes)
    tensors, config = read(tmp_path / ADAPTER_FILE)
    assert set(config["layers"]) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
                                     for m in ("query", "value")}
    assert all(torch.equal(tensors[k], v) for k, v in saved(model).items())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith(".B"))  # it trained
    torch.manual_seed(0)  # the final file loads into a fresh base as any adapter file does
    fresh = peftlite.load(BertForSequenceClassification(model.config), tmp_path / ADAPTER_FILE)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved(model).items())


def test_resume_restores_the_adapter_and_continues_as_one_run(tmp_path):
    whole = tiny_bert()
    AdapterTrainer(model=whole, args=arguments(tmp_path / "whole"), train_dataset=Tokens()).train()

    first = tiny_bert()  # the same 4-step schedule, interrupted after the checkpoint at step 2
    AdapterTrainer(model=first, args=arguments(tmp_path / "cut"), train_dataset=Tokens(), callbacks=[StopAt(2)]).train()
    assert not (tmp_path / "cut" / "checkpoint-4").exists()
    resumed = tiny_bert()  # a fresh base, wrapped the same way; its adapter starts at B = 0
    trainer = AdapterTrainer(model=resumed, args=arguments(tmp_path / "cut"), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    want, got = saved(whole), saved(resumed)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any((got[k] - saved(first)[k]).abs().max() > 1e-4 for k in got)  # it did train after the resume


def test_resume_true_finds_the_last_checkpoint(tmp_path):
    AdapterTrainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=2), train_dataset=Tokens()).train()
    model = tiny_bert()
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4 and "checkpoint-4" in os.listdir(tmp_path)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    scores = iter([3.0, 1.0, 2.0, 0.0])  # the first evaluation (step 1) is the best
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=True)
    model = tiny_bert()
    trainer = AdapterTrainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(8, seed=1),
                             compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best, _ = read(tmp_path / "checkpoint-1" / ADAPTER_FILE)
    last, _ = read(tmp_path / "checkpoint-4" / ADAPTER_FILE)
    now = saved(model)
    assert all(torch.equal(now[k], v) for k, v in best.items())
    assert not all(torch.equal(now[k], v) for k, v in last.items())


def test_resume_from_a_folder_without_an_adapter_file_names_it(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    trainer = AdapterTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Tokens())
    with pytest.raises(ValueError, match=r"has no adapter\.safetensors .*trainer_state\.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_refuses_an_unwrapped_model_and_an_ambiguous_adapter(tmp_path):
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="not wrapped"):
        AdapterTrainer(model=plain, args=arguments(tmp_path))
    model = peftlite.wrap(tiny_bert(), TARGETS, rank=2, name="second")
    with pytest.raises(ValueError, match="adapter_name="):
        AdapterTrainer(model=model, args=arguments(tmp_path))
    with pytest.raises(KeyError, match="'third'"):
        AdapterTrainer(model=model, args=arguments(tmp_path), adapter_name="third")
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(),
                             adapter_name="second")
    trainer.train()
    _, config = read(tmp_path / "checkpoint-2" / ADAPTER_FILE)
    assert config["adapter"] == "second"
