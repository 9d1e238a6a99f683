"""`SFTTrainer`: TRL's SFTTrainer for a lorakit model.

    trainer = SFTTrainer(model=get_peft_model(base, config), args=SFTConfig("out"), train_dataset=ds)

Besides saving and resuming adapters (`AdapterTrainerMixin`), it moves TRL's fused LM-head loss
to where TRL puts it for a PEFT model: onto the user's model (`get_base_model()`), whose
`base_model` is the transformer backbone. On the lorakit wrapper itself `base_model` means what
it means in PEFT (the LoRA model), which the patch cannot use.
"""

from __future__ import annotations

import trl
from trl.trainer.utils import add_fused_lm_head

from ..peft_model import PeftModel
from .trainer import AdapterTrainerMixin

# add_fused_lm_head's settings, read back from the patch TRL made, with TRL 1.x's values as fallbacks.
_FUSED_DEFAULTS = {"temperature": 1.0, "cast_lm_head_to_fp32": False, "outputs": ("log_probs", "entropy", "is_top1")}


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """`trl.SFTTrainer` (same arguments) that trains, saves and resumes lorakit models as adapters."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
