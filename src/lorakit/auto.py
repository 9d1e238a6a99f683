"""`AutoPeftModelFor*`: load an adapter folder together with the base model it names.

    model = AutoPeftModelForCausalLM.from_pretrained("out/adapter", torch_dtype=torch.bfloat16)

The base is read from the adapter's `base_model_name_or_path` and loaded with transformers'
matching auto class from a local folder (or lorakit's embedded default model); lorakit never
downloads, so a hub id there is an error saying how to get the folder. Then the adapter is
loaded onto it with `PeftModel.from_pretrained`, as PEFT does.
"""

from __future__ import annotations

import os
from typing import Any

from .config import AdapterLoadError, PeftConfig, pop_hub_arguments
from .hub import ModelLoadError, resolve_model_dir
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel

# Arguments that belong to PeftModel.from_pretrained; every other keyword goes to the base model's loader.
_ADAPTER_ARGUMENTS = ("adapter_name", "is_trainable", "config", "allow_pickle", "subfolder",
                      "autocast_adapter_dtype", "ephemeral_gpu_offload")


class AutoPeftModel:
    """Base class: `from_pretrained(adapter_folder, ...)` gives a PeftModel on its base model.

    Subclasses set the transformers auto class (`_auto_class`) and the task the adapter must
    have been trained for (`_task_type`; None accepts any).
    """

    _auto_class = "AutoModel"
    _task_type: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        **kwargs: Any) -> PeftModel:
        """Load the base model the adapter names, then the adapter onto it.

        Args:
            pretrained_model_name_or_path: A local adapter folder.
            adapter_name: Name to give the adapter. Default "default".
            is_trainable: Keep the adapter trainable. Default False (inference mode).
            config: A config to use instead of the folder's.
            revision: Hub-only; an error unless everything is local.
            **kwargs: `subfolder`, `allow_pickle` go to the adapter; anything else (`torch_dtype`,
                `dtype`, `device_map`, `attn_implementation`, ...) to the base model's
                `from_pretrained`.

        Raises:
            AdapterLoadError: the adapter folder is missing or invalid, or it was trained for
                another task than this class loads.
            ModelLoadError: the base model named by the adapter is not a local folder.
        """
        import transformers

        adapter_kwargs = {k: kwargs.pop(k) for k in _ADAPTER_ARGUMENTS if k in kwargs}
        hub = pop_hub_arguments(kwargs)
        if revision is not None:
            hub["revision"] = revision
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path,
                                                           subfolder=adapter_kwargs.get("subfolder"), **hub)
        if cls._task_type is not None and peft_config.task_type not in (None, cls._task_type):
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[peft_config.task_type].__name__
            raise AdapterLoadError(
                f"{pretrained_model_name_or_path}: the adapter was trained for task_type "
                f"{peft_config.task_type!r} ({expected}), not {cls._task_type!r}; load it with the matching "
                f"AutoPeftModelFor* class")
        base_dir = _base_model_dir(peft_config.base_model_name_or_path, pretrained_model_name_or_path, hub)
        auto_class = getattr(transformers, cls._auto_class)
        kwargs.setdefault("local_files_only", True)
        base = auto_class.from_pretrained(base_dir, **kwargs)
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(cls._task_type or peft_config.task_type, PeftModel)
        return peft_cls.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=config, **adapter_kwargs)


def _base_model_dir(name: str | None, adapter: str | os.PathLike, hub: dict[str, Any]) -> str:
    """The local folder of the base model an adapter names."""
    if name is None:  # not the embedded default (which None means to lorakit.hub): the adapter names no base
        raise AdapterLoadError(f"{adapter}: adapter_config.json has no base_model_name_or_path; load the base "
                               "yourself and use PeftModel.from_pretrained(base, adapter)")
    try:
        return str(resolve_model_dir(name))
    except ModelLoadError as err:
        given = f" (with {', '.join(sorted(hub))})" if hub else ""
        raise ModelLoadError(
            f"the adapter in {str(adapter)!r} names its base model {name!r}{given}, which is not a local model "
            f"folder: lorakit never downloads. Download it first (e.g. `hf download {name} --local-dir ./base`), "
            "then load it yourself and add the adapter: base = AutoModelForCausalLM.from_pretrained('./base'); "
            f"model = PeftModel.from_pretrained(base, {str(adapter)!r})  ({err})") from err


class AutoPeftModelForCausalLM(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModelForCausalLM`, then the adapter."""

    _auto_class = "AutoModelForCausalLM"
    _task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModelForSequenceClassification`, then the adapter."""

    _auto_class = "AutoModelForSequenceClassification"
    _task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModelForTokenClassification`, then the adapter."""

    _auto_class = "AutoModelForTokenClassification"
    _task_type = "TOKEN_CLS"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModelForSeq2SeqLM`, then the adapter."""

    _auto_class = "AutoModelForSeq2SeqLM"
    _task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModelForQuestionAnswering`, then the adapter."""

    _auto_class = "AutoModelForQuestionAnswering"
    _task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    """`from_pretrained(adapter)`: the base with `AutoModel`, then the adapter."""

    _auto_class = "AutoModel"
    _task_type = "FEATURE_EXTRACTION"
