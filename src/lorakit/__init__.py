"""lorakit: LoRA fine-tuning with adapters interchangeable with PEFT.

    from lorakit import LoraConfig, get_peft_model, PeftModel
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
"""

from .config import ConfigError, LoraConfig
from .io import AdapterLoadError
from .model import BASE_ADAPTER, LoraModel, PeftModel, get_peft_model
from .targeting import DEFAULT_TARGET_MODULES, TargetError

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "get_peft_model",
    "PeftModel",
    "LoraModel",
    "ConfigError",
    "TargetError",
    "AdapterLoadError",
    "DEFAULT_TARGET_MODULES",
    "BASE_ADAPTER",
]
