"""`SFTTrainer`: TRL's SFTTrainer for a lorakit model.

    trainer = SFTTrainer(model=get_peft_model(base, config), args=SFTConfig("out"), train_dataset=ds)

It also takes a lorakit `LoraConfig` as `peft_config=` (with `model` a model or a local path, as
TRL takes a PEFT config) and wraps the model with `lorakit.get_peft_model`.

Besides saving and resuming adapters (`AdapterTrainerMixin`), it moves TRL's fused LM-head loss
to where TRL puts it for a PEFT model: onto the user's model (`get_base_model()`), whose
`base_model` is the transformer backbone. On the lorakit wrapper itself `base_model` means what
it means in PEFT (the LoRA model), which the patch cannot use.
"""

from __future__ import annotations

from typing import Any

import transformers
import trl
from trl.trainer.utils import add_fused_lm_head, create_model_from_path

from ..config import LoraConfig
from ..peft_model import PeftModel, get_peft_model
from .trainer import AdapterTrainerMixin

# add_fused_lm_head's settings, read back from the patch TRL made, with TRL 1.x's values as fallbacks.
_FUSED_DEFAULTS = {"temperature": 1.0, "cast_lm_head_to_fp32": False, "outputs": ("log_probs", "entropy", "is_top1")}


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """`trl.SFTTrainer` (same arguments) that trains, saves and resumes lorakit models as adapters."""

    def __init__(self, model: Any, args: Any = None, *more: Any, peft_config: Any = None, **kwargs: Any) -> None:
        if isinstance(peft_config, LoraConfig):
            if isinstance(model, PeftModel):
                raise ValueError("pass either a lorakit model or peft_config, not both (the model already has "
                                 "its adapter); to train another adapter, merge_and_unload() it first")
            transformers.set_seed(getattr(args, "seed", 42))  # the adapter's init, reproducible as in TRL
            if isinstance(model, str):
                model = create_model_from_path(model, **dict(getattr(args, "model_init_kwargs", None) or {}))
            model, peft_config = get_peft_model(model, peft_config), None
        super().__init__(model, args, *more, peft_config=peft_config, **kwargs)
        model = self._adapter_model()
        if model is not None:
            _move_fused_head(model)


def _move_fused_head(model: PeftModel) -> None:
    """Take TRL's fused-head forward off the wrapper and put it on the user's model."""
    patched = model.__dict__.pop("forward", None)
    if patched is None:
        return
    func = getattr(patched, "__func__", None)
    closure = dict(zip(func.__code__.co_freevars, (c.cell_contents for c in func.__closure__ or ()))) if func else {}
    settings = {k: closure.get(k, v) for k, v in _FUSED_DEFAULTS.items()}
    add_fused_lm_head(model.get_base_model(), **settings)
