"""lorakit: LoRA fine-tuning with PEFT's API and adapters interchangeable with PEFT.

    from lorakit import LoraConfig, TaskType, get_peft_model, PeftModel
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type=TaskType.CAUSAL_LM))

Code written for PEFT runs with `from peft import ...` changed to `from lorakit import ...`
(see the README's "Coming from PEFT").
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import AdapterLoadError, ConfigError, LoraConfig, PeftConfig, PeftType, TaskType
from .kbit import prepare_model_for_kbit_training
from .model import BASE_ADAPTER, LoraModel
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from .targeting import DEFAULT_TARGET_MODULES, TargetError

__version__ = "0.1.0"

__all__ = [
    # PEFT's names
    "LoraConfig",
    "PeftConfig",
    "TaskType",
    "PeftType",
    "get_peft_model",
    "inject_adapter_in_model",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForSeq2SeqLM",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "LoraModel",
    # lorakit's own
    "ConfigError",
    "TargetError",
    "AdapterLoadError",
    "DEFAULT_TARGET_MODULES",
    "BASE_ADAPTER",
]
