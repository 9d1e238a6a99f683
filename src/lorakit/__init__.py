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

# PEFT names for what lorakit does not implement: importing one says so, rather than "cannot import name".
_NOT_IMPLEMENTED = {
    **{name: "a PEFT method other than LoRA" for name in (
        "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "AdaLoraConfig", "IA3Config",
        "LoHaConfig", "LoKrConfig", "OFTConfig", "BOFTConfig", "VeraConfig", "FourierFTConfig", "LNTuningConfig",
        "PolyConfig", "XLoraConfig", "HRAConfig", "VBLoRAConfig", "BoneConfig", "CPTConfig", "MultitaskPromptTuningConfig")},
    "PeftMixedModel": "PEFT's mixing of adapter types (several LoRA adapters on one model need nothing special)",
    "LoftQConfig": "LoftQ initialisation",
    "EvaConfig": "EVA initialisation",
    "replace_lora_weights_loftq": "LoftQ initialisation",
}


def __getattr__(name: str):
    if name in _NOT_IMPLEMENTED:
        raise ImportError(f"lorakit does not implement {name} ({_NOT_IMPLEMENTED[name]}): lorakit is LoRA only "
                          "(with DoRA, rsLoRA, PiSSA/OLoRA init and QLoRA); see the README's 'Coming from PEFT'")
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

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
