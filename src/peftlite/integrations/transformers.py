"""Hugging Face ``Trainer`` with adapter-only checkpoints: ``AdapterTrainer``.

A plain ``Trainer`` saves a wrapped model with ``save_pretrained``: every frozen base weight, in every
checkpoint. ``AdapterTrainer`` writes the peftlite adapter file instead (``peftlite.save``: adapters,
heads and trainable tensors), and reads it back when resuming and for ``load_best_model_at_end``::

    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    peftlite.wrap(model, ["query", "value"], rank=8, trainable=["classifier"])
    args = TrainingArguments(output_dir="out", save_steps=500)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train)
    trainer.train()         # out/checkpoint-500/: adapter.safetensors, optimizer.pt, scheduler.pt, ...
    trainer.save_model()    # out/adapter.safetensors; peftlite.load(fresh_base, it) as any adapter file

    # to resume, in a new process: the same base, wrapped the same way, and the same arguments
    AdapterTrainer(model=model, args=args, train_dataset=train).train(resume_from_checkpoint=True)

A checkpoint folder holds ``adapter.safetensors``, ``training_args.bin``, the processing class's files,
and what ``Trainer`` writes beside the model (optimizer, scheduler, RNG and trainer state). A callback
cannot do this: ``on_save`` runs after ``Trainer`` has written the full weights, and a resume refuses a
folder without a weights file it knows; so the subclass replaces the three model-file methods of
``Trainer`` (transformers 5.x): ``_save``, ``_load_from_checkpoint`` and ``_load_best_model``.

Tested in single-process training (under DDP the main process writes, as in ``Trainer``); DeepSpeed and
FSDP, which shard the parameters, are refused.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from ..formats.native import load, save
from ..state import wrap_state

ADAPTER_FILE = "adapter.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"  # Trainer's name for it


class AdapterTrainer(Trainer):
    """A ``transformers.Trainer`` for a peftlite-wrapped model that saves and resumes the adapter file only.

    Args:
        *args, **kwargs: as for ``Trainer``; ``model`` (or what ``model_init`` returns) must be wrapped
            with ``peftlite.wrap``.
        adapter_name: the adapter to save and restore; may be left out when the model has one.

    Raises:
        ValueError: the model is not wrapped; it has several adapters and no ``adapter_name``; DeepSpeed
            or FSDP is enabled.
        KeyError: an unknown ``adapter_name``.
    """

    def __init__(self, *args, adapter_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_name = adapter_name
        state = wrap_state(self.model)
        if state is None:
            raise ValueError("AdapterTrainer: the model is not wrapped; call peftlite.wrap(model, ...) before "
                             "building the trainer (or use a plain transformers.Trainer)")
        if adapter_name is None and len(state.adapters) > 1:
            raise ValueError(f"AdapterTrainer: the model has {len(state.adapters)} adapters "
                             f"({', '.join(map(repr, state.adapters))}) and a checkpoint holds one; pass "
                             "adapter_name=")
        if adapter_name is not None and adapter_name not in state.adapters:
            raise KeyError(f"AdapterTrainer: no adapter named {adapter_name!r}; the model has "
                           f"{', '.join(map(repr, state.adapters)) or 'none'}")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("AdapterTrainer: DeepSpeed and FSDP shard the parameters, which peftlite.save "
                             "cannot gather; train without them, or use a plain transformers.Trainer")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter file (not the base weights), the processing class and the training arguments.

        ``state_dict``, which ``Trainer`` passes for sharded models only, is not used: those are refused.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save(model, os.path.join(output_dir, ADAPTER_FILE), name=self.adapter_name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load the checkpoint's adapter file into the (wrapped) model; all or nothing, as ``peftlite.load``."""
        path = os.path.join(resume_from_checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            found = sorted(os.listdir(resume_from_checkpoint)) if os.path.isdir(resume_from_checkpoint) else None
            raise ValueError(f"AdapterTrainer: {resume_from_checkpoint} has no {ADAPTER_FILE} "
                             f"({'no such folder' if found is None else 'it holds: ' + (', '.join(found) or 'nothing')}"
                             "); resume from a checkpoint that AdapterTrainer wrote")
        load(model if model is not None else self.model, path, name=self.adapter_name)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapter file, loaded into the model."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)
