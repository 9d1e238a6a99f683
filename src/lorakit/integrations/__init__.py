"""transformers' `Trainer` and TRL's `SFTTrainer`, for lorakit models.

    from lorakit.integrations import Trainer          # instead of transformers.Trainer
    from lorakit.integrations import SFTTrainer       # instead of trl.SFTTrainer (needs trl)

transformers and TRL recognise an adapter model only as an instance of `peft.PeftModel`; lorakit
never imports peft, so the plain classes treat a lorakit model as an ordinary one. Training works
with them, but checkpoints and `save_model()` hold the full model's weights, resuming cannot
read an adapter back, and TRL's fused loss looks for the backbone at the wrong place. These
drop-in subclasses (same names, same arguments) do what the plain classes do for a PEFT model:
they write and read PEFT-format adapter folders, and give TRL the user's model where it needs it.
For any other model they behave exactly as the classes they extend.
"""

from __future__ import annotations

from .trainer import AdapterTrainerMixin, Trainer

__all__ = ["Trainer", "SFTTrainer", "AdapterTrainerMixin"]


def __getattr__(name: str):
    if name == "SFTTrainer":  # imported on first use: only where TRL is installed
        try:
            from .trl import SFTTrainer
        except ImportError as err:
            raise ImportError(f"lorakit.integrations.SFTTrainer needs TRL: pip install trl ({err})") from err
        return SFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
