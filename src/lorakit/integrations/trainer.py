"""`Trainer`: transformers' Trainer, saving and resuming a lorakit model as PEFT adapter folders.

    trainer = Trainer(model=get_peft_model(base, config), args=TrainingArguments("out"), train_dataset=ds)
    trainer.train()                    # out/checkpoint-N/: adapter_config.json, adapter_model.safetensors, ...
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out/final")    # an adapter folder PEFT, vLLM and lorakit load
"""

from __future__ import annotations

import inspect
import os

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINING_ARGS_NAME

from ..config import CONFIG_NAME
from ..adapter_format import WEIGHTS_NAME
from ..peft_model import PeftModel


class AdapterTrainerMixin:
    """What transformers' Trainer does for a `peft.PeftModel`, done for a lorakit `PeftModel`:
    `_save` writes the adapters (not the full weights), `_load_from_checkpoint` /
    `_load_best_model` load them back into the adapters being trained, and label smoothing shifts
    a causal LM's labels. Mixed in before a
    `transformers.Trainer` subclass; any other model takes the parent's path unchanged."""

    def _adapter_model(self, model: torch.nn.Module | None = None) -> PeftModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        adapter_model = self._adapter_model(model)
        if (adapter_model is None or self.label_smoother is None or self.compute_loss_func is not None
                or "labels" not in inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # With label smoothing, Trainer shifts the labels of a causal LM, which it recognises by
        # class name, read off the base model for a PEFT model: do the same for lorakit's wrapper.
        causal = adapter_model.get_base_model()._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        smoother = self.label_smoother
        counted = "num_items_in_batch" in inspect.signature(smoother.__call__).parameters  # newer transformers

        def smoothed_loss(outputs, labels, num_items_in_batch=None):
            if counted:
                return smoother(outputs, labels, shift_labels=causal, num_items_in_batch=num_items_in_batch)
            return smoother(outputs, labels, shift_labels=causal)

        self.compute_loss_func = smoothed_loss
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self.compute_loss_func = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapters(self, model: PeftModel, folder: str) -> None:
        """Load the adapters saved in `folder` into `model`, as Trainer does for PEFT: with adapters
        in subfolders, the folder's own is "default" and each subfolder its namesake; otherwise the
        folder's adapter is the active one. The active adapter stays trainable and active."""
        active = model.active_adapter
        subdirs = sorted(name for name in os.listdir(folder) if _is_adapter_dir(os.path.join(folder, name)))
        if not subdirs:
            model.load_adapter(folder, active, is_trainable=True)
            return
        if _is_adapter_dir(folder):
            model.load_adapter(folder, "default", is_trainable=(active == "default"))
        for name in subdirs:
            model.load_adapter(os.path.join(folder, name), name, is_trainable=(name == active))
        model.set_adapter(active)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        adapter_model = self._adapter_model(model)
        if adapter_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not _is_adapter_dir(resume_from_checkpoint) and not any(
                _is_adapter_dir(os.path.join(resume_from_checkpoint, n)) for n in os.listdir(resume_from_checkpoint)):
            raise ValueError(f"{resume_from_checkpoint} holds no adapter ({CONFIG_NAME}); it was not written by "
                             "lorakit.integrations.Trainer for this model")
        self._load_adapters(adapter_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        adapter_model = self._adapter_model()
        if adapter_model is None:
            return super()._load_best_model()
        self._load_adapters(adapter_model, self.state.best_model_checkpoint)


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` (same arguments) that saves and resumes lorakit models as adapters."""


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))
