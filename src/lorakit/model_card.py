"""The README.md model card written into every adapter folder, as PEFT writes one.

    text = model_card(config, folder_name="my-adapter")

The YAML front matter carries what the Hugging Face Hub reads (`base_model`, `library_name:
peft`, tags); the body says what the adapter is (base model, LoRA settings) and how to load it
with lorakit and with PEFT. A README.md the user wrote is never overwritten: only a card that
carries `CARD_MARKER` (one lorakit wrote) is replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LoraConfig

CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by lorakit; edit freely: lorakit leaves a card without this line alone -->"

# PEFT task label -> (Hub pipeline tag, transformers auto class used in the loading example)
_TASKS = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


def model_card(config: LoraConfig, folder_name: str = "path/to/adapter") -> str:
    """The model card text for an adapter with `config`.

    Args:
        config: The adapter's config (its base model, task and LoRA settings are shown).
        folder_name: How the loading example names the adapter folder.

    Returns:
        Markdown with YAML front matter, ending in a newline.
    """
    base = config.base_model_name_or_path or "BASE_MODEL"
    pipeline, auto_class = _TASKS.get(config.task_type or "", ("", "AutoModel"))
    front = ["---", f"base_model: {base}" if config.base_model_name_or_path else None, "library_name: peft",
             f"pipeline_tag: {pipeline}" if pipeline else None, "tags:",
             f"- base_model:adapter:{base}" if config.base_model_name_or_path else None,
             "- lora", "- lorakit", "- transformers", "---"]
    targets = config.target_modules
    shown_targets = ", ".join(targets) if isinstance(targets, list) else repr(targets)
    settings = [("r", config.r), ("lora_alpha", config.lora_alpha), ("target_modules", shown_targets),
                ("lora_dropout", config.lora_dropout), ("bias", config.bias), ("use_rslora", config.use_rslora),
                ("use_dora", config.use_dora), ("init_lora_weights", config.init_lora_weights),
                ("task_type", config.task_type)]
    if config.rank_pattern:
        settings.append(("rank_pattern", config.rank_pattern))
    if config.alpha_pattern:
        settings.append(("alpha_pattern", config.alpha_pattern))
    if config.modules_to_save:
        settings.append(("modules_to_save", ", ".join(config.modules_to_save)))
    rows = "\n".join(f"| `{key}` | {value} |" for key, value in settings)
    body = f"""
{CARD_MARKER}

# LoRA adapter for `{base}`

A LoRA adapter (ΔW = B·A per target layer, scaled by lora_alpha / r) in PEFT's file format:
`adapter_config.json` and `adapter_model.safetensors`. It loads with lorakit, with PEFT and in
vLLM, with the same outputs.

## LoRA settings

| setting | value |
|---|---|
{rows}

## Load it

With lorakit:

```python
from transformers import {auto_class}
from lorakit import PeftModel

base = {auto_class}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{folder_name}")
```

With PEFT, the same code with `from peft import PeftModel`.
From the command line: `lorakit generate "..." --model {base} --adapter {folder_name}`.
"""
    return "\n".join(line for line in front if line is not None) + "\n" + body
