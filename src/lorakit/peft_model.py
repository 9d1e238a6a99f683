"""The model users hold, with PEFT's public surface: `PeftModel`, its task classes, `get_peft_model`.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM))
    model.save_pretrained("out/adapter")
    model = PeftModel.from_pretrained(base, "out/adapter")

`PeftModel` (what users hold) -> `.base_model`: `LoraModel` (owns the adapters, `lorakit.model`)
-> `.model`: the user's model. Parameter names are PEFT's
(`base_model.model.<path>.lora_A.<adapter>.weight`), and so are the meanings of `base_model`,
`get_base_model()`, `active_adapter(s)`, `load_adapter` and the state-dict helpers, which
transformers' Trainer and TRL rely on.

`peft_model.forward` advertises the wrapped model's own signature (plus `adapter_names`), so
code that inspects it, as `Trainer` does to choose which dataset columns to keep, sees
`input_ids`, `attention_mask`, `labels`, ... The task classes (`PeftModelForCausalLM`, ...)
declare PEFT's named arguments on the class, which is where `Trainer` looks for label names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import adapter_format
from .config import LoraConfig, resolve_adapter_dir
from .quant.lora import quantize_for_lora
from .quant.registry import quantizer_of
from .model import SECOND_INJECTION_WARNING, LoraModel, base_model_name, holds_adapters, warn_user

# --- forward: the method, with the wrapped model's signature -------------------------------------


class _BoundForward:
    """`peft_model.forward`: a bound method whose `inspect.signature` is the wrapped model's
    forward plus `adapter_names`.

    Code that rebinds a forward (accelerate's mixed-precision wrapper does
    `MethodType(autocast(model.forward.__func__), model)`) gets, as `__func__`, a function
    carrying that same signature (with `self`), so the rebound method still shows it."""

    __slots__ = ("_func", "__self__")

    def __init__(self, func: Callable, obj: PeftModel) -> None:
        self._func = func
        self.__self__ = obj

    def __call__(self, *args, **kwargs):
        return self._func(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return _with_adapter_names(inspect.signature(self.__self__.get_base_model().forward))

    @property
    def __func__(self) -> Callable:
        func = self._func

        @functools.wraps(func)
        def forward(self, *args, **kwargs):
            return func(self, *args, **kwargs)

        signature = self.__signature__
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])
        return forward


class forward_method:
    """Decorator for `PeftModel.forward`: on the class the plain function (with its declared
    signature), on an instance a `_BoundForward`. A non-data descriptor, so a forward patched
    onto an instance (TRL, accelerate) takes precedence, as for any method."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, objtype=None):
        return self.func if obj is None else _BoundForward(self.func, obj)


def _with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    if "adapter_names" in signature.parameters:
        return signature
    params = list(signature.parameters.values())
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=params[:at] + [extra] + params[at:])


# --- the wrapper -------------------------------------------------------------------------------------


class PeftModel(nn.Module):
    """The model users hold: a `LoraModel` plus files, counting and generation.

    Methods of `LoraModel` (merge_adapter, unmerge_adapter, unload, disable_adapter, set_adapter,
    delete_adapter, add_weighted_adapter, lora_layers) and attributes of the user's model
    (config, generation_config, enable_input_require_grads, gradient_checkpointing_enable, ...)
    are reached through this object too, as in PEFT.

    Args:
        model: The base model (modified in place).
        peft_config: The first adapter's config.
        adapter_name: Its name. Default "default".
        autocast_adapter_dtype: Accepted for PEFT's signature; lorakit always keeps adapter
            weights in float32 (float64 on a float64 base), whatever the base dtype.
        low_cpu_mem_usage: Create the factors on the meta device, for weights loaded next.
    """

    # transformers' Trainer refuses a quantized model unless adapters are attached, which it reads
    # from this flag (set by its own PEFT integration) or from isinstance(peft.PeftModel).
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    @classmethod
    def from_tensors(cls, model: nn.Module, peft_config: LoraConfig, tensors: dict[str, torch.Tensor],
                     adapter_name: str = "default", source: str = "") -> PeftModel:
        """A PeftModel whose first adapter is loaded from tensors already read and checked on their
        own (`adapter_format.read_adapter`); see `LoraModel.add_adapter_from_tensors`.

        Raises:
            AdapterLoadError: the tensors do not fit the model (named); the model is left as it was.
        """
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model.base_model = LoraModel(model, peft_config, adapter_name, tensors=tensors, source=source)
        return peft_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- what PEFT code reads --------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The adapters that run (PEFT's list form of `active_adapter`)."""
        return [self.base_model.active_adapter]

    @property
    def peft_type(self) -> str:
        return self.peft_config[self.active_adapter].peft_type

    def get_base_model(self) -> nn.Module:
        """The user's model (with its LoRA layers in place)."""
        return self.base_model.model

    # --- forward and generation --------------------------------------------------------------------

    @forward_method
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward; `adapter_names` (one per row, or "__base__") mixes adapters in a batch."""
        return self._run(self.base_model.model, adapter_names, args, kwargs)

    def _run(self, call: Callable, adapter_names: list[str] | None, args: tuple, kwargs: dict):
        """`call(*args, **kwargs)` (the model's forward or generate), each row with its adapter when
        `adapter_names` is given."""
        if adapter_names is None:
            return call(*args, **kwargs)
        self._check_batch(adapter_names, args, kwargs)
        with self.base_model.mixed_batch(adapter_names):
            return call(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """transformers' generate; `adapter_names` as in forward."""
        return self._run(self.base_model.model.generate, adapter_names, args, kwargs)

    @staticmethod
    def _check_batch(adapter_names: list[str], args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(first, torch.Tensor) and first.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {first.shape[0]} rows")

    # --- adapters ------------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new, inactive adapter (see `LoraModel.add_adapter`)."""
        self.base_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model (PEFT's signature; `progressbar`
        is accepted and ignored). See `LoraModel.merge_and_unload`."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names, dtype=dtype)

    # --- counting ------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; works on a meta-device model.

        4-bit layers (lorakit's and bitsandbytes') count their weight's logical size, as PEFT does.
        """
        trainable = total = 0
        for p in self.parameters():
            # bitsandbytes' 4-bit parameter packs two values into each byte of its storage (PEFT's count)
            n = p.numel() * 2 * p.element_size() if hasattr(p, "quant_state") and hasattr(p, "quant_type") else p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        for module in self.modules():
            quantizer = quantizer_of(module)
            if quantizer is not None:  # the packed weight is a buffer, not a parameter
                total += quantizer.logical_numel(module)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- files -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Write each adapter as PEFT does: "default" in `save_directory`, others in a subfolder,
        each with `adapter_config.json`, `adapter_model.safetensors` and a README.md model card.

        A folder that does not exist is written whole under a temporary name and renamed; in an
        existing folder each file is replaced through a temporary name (the config last).

        Args:
            save_directory: Folder to write into (created if missing).
            safe_serialization: Accepted for PEFT's signature; lorakit writes safetensors only
                (False warns).
            selected_adapters: Adapters to write. Default: all.
            save_embedding_layers: Accepted for PEFT's signature; lorakit never writes the base
                embedding weights (PEFT's "auto" does, for an adapted embedding).
            is_main_process: False writes nothing (the other ranks of a distributed run).
            path_initial_model_for_weight_conversion: For an adapter trained from a PiSSA/OLoRA
                init: the folder where that adapter was saved right after `get_peft_model`, before
                training. Each selected adapter is then written converted to a plain LoRA adapter
                for the ORIGINAL base (rank 2r: A' = [A; A0], B' = [B, -B0], PEFT's conversion; see
                `lorakit.convert`). The initial folder is only read.
            state_dict: The model's state dict to take the adapter's tensors from (e.g. one
                gathered from shards, as transformers' Trainer passes it). Default: the model's own.
            **kwargs: PEFT's other arguments (hub ones, `convert_pissa_to_lora`); ignored.

        Raises:
            KeyError: an unknown adapter name.
            ValueError: an adapter holds NaN or inf (nothing written for it).
            AdapterLoadError, ConversionError: with path_initial_model_for_weight_conversion, the
                initial adapter is unreadable or does not match the trained one.
        """
        if not is_main_process:
            return
        if not safe_serialization:
            warnings.warn("lorakit writes adapter_model.safetensors only (safe_serialization=False is ignored)",
                          stacklevel=2)
        names = selected_adapters or list(self.peft_config)
        for name in names:
            self.base_model.check_exists(name)
        state = None if state_dict is None else rekey(state_dict, adapter_format.KEY_PREFIX, "")
        if path_initial_model_for_weight_conversion is None:
            for name in names:
                adapter_format.save_adapter(self.base_model, save_directory, name, state=state)
            return
        from .convert import converted_adapter

        initial = adapter_format.read_adapter(path_initial_model_for_weight_conversion)
        for name in names:
            config, tensors = converted_adapter(self.peft_config[name], adapter_format.adapter_tensors(self.base_model, name, state),
                                                *initial, source=str(path_initial_model_for_weight_conversion))
            adapter_format.write_adapter(adapter_format.adapter_dir(save_directory, name), config, tensors, what=f"adapter {name!r}")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, allow_pickle: bool = False, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                        key_mapping: dict[str, str] | None = None, **kwargs: Any) -> PeftModel:
        """Load an adapter folder onto `model` (PEFT's arguments).

        Called on `PeftModel` itself, the result is the task class the adapter's `task_type`
        names (`PeftModelForCausalLM`, ...), as in PEFT.

        Args:
            model: The base model (modified in place: its target layers are wrapped).
            model_id: A local folder holding adapter_config.json and adapter_model.safetensors.
            adapter_name: Name to give the adapter. Default "default". A name the model already
                holds (from an earlier wrapper over the same base) is replaced whole.
            is_trainable: Keep the adapter trainable; otherwise it is frozen (inference mode).
            config: A LoraConfig to use instead of the folder's adapter_config.json.
            autocast_adapter_dtype, ephemeral_gpu_offload, low_cpu_mem_usage: Accepted for PEFT's
                signature (factors are always created empty and filled from the file).
            allow_pickle: Accept a pickled adapter_model.bin (loaded with weights_only=True).
            subfolder: A folder inside `model_id` holding the adapter.
            torch_dtype, dtype: The adapter weights' dtype. Default float32.
            key_mapping: PEFT's key renaming; only None is accepted.
            **kwargs: Hub-only arguments (`revision`, `token`, ...): ignored for a local folder,
                an `AdapterLoadError` saying lorakit is offline for anything else.

        Returns:
            The PeftModel, in eval mode unless `is_trainable` (as PEFT leaves it).

        Raises:
            AdapterLoadError: the files are missing, malformed, or do not fit the model; the
                model is then left exactly as it was.
        """
        folder = resolve_adapter_dir(model_id, subfolder=subfolder, **kwargs)
        file_config, tensors = adapter_format.read_adapter(folder, allow_pickle=allow_pickle)
        config = dataclasses.replace(config or file_config, inference_mode=not is_trainable)
        if key_mapping:
            raise ValueError("key_mapping (renaming a checkpoint's keys on load) is not supported: save the adapter "
                             "with PEFT's key names (lorakit's and PEFT's are the same)")
        target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls) if cls is PeftModel else cls
        peft_model = target_cls.from_tensors(model, config, tensors, adapter_name, source=str(folder))
        peft_model._move_adapter(adapter_name, dtype=dtype or torch_dtype)
        if not is_trainable:
            peft_model.eval()  # as PEFT: an adapter loaded for inference runs without dropout
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     allow_pickle: bool = False, subfolder: str | None = None, **kwargs: Any):
        """Load an adapter folder under `adapter_name` (not made active).

        A new name is injected; for a name the model holds already, the folder's weights replace
        that adapter's in place (as PEFT does; transformers' Trainer resumes a run this way), after
        every key and shape has been checked. `torch_device` moves the adapter's weights there;
        without `is_trainable` the model is put in eval mode, as PEFT does.

        Returns:
            PEFT's load result: `missing_keys` and `unexpected_keys`, both empty (lorakit refuses
            a folder that has either).

        Raises:
            AdapterLoadError: as for `from_pretrained`, or (existing name) the folder's tensors do
                not fit that adapter; the model keeps everything as it was.
            ValueError: the name is invalid.
        """
        folder = resolve_adapter_dir(model_id, subfolder=subfolder, **kwargs)
        config, tensors = adapter_format.read_adapter(folder, allow_pickle=allow_pickle)
        if adapter_name not in self.peft_config:
            config = dataclasses.replace(config, inference_mode=not is_trainable)
            self.base_model.add_adapter_from_tensors(adapter_name, config, tensors, source=str(folder))
        else:
            adapter_format.load_weights(self.base_model, adapter_name, tensors, source=str(folder))
            current = self.peft_config[adapter_name]
            self.peft_config[adapter_name] = dataclasses.replace(current, inference_mode=not is_trainable)
            self.base_model.set_adapter(self.active_adapter)  # re-marks which parameters train
        self._move_adapter(adapter_name, device=torch_device)
        if not is_trainable and self.training:
            self.eval()  # as PEFT (an eval model, the usual case when serving, is not walked again)
        return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def _move_adapter(self, adapter_name: str, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> None:
        """Put adapter `adapter_name`'s parameters on `device` and/or in `dtype` (None: unchanged)."""
        if device is None and dtype is None:
            return
        for _, wrapper in self.base_model.wrappers():
            for p in wrapper.adapter_parameters(adapter_name):
                p.data = p.data.to(device=device, dtype=dtype)


def rekey(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """`tensors` with the prefix `old` of each key replaced by `new` (keys without it are dropped)."""
    return {new + k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}


# --- the task classes --------------------------------------------------------------------------------


def _task_forward(*names: str) -> forward_method:
    """A forward declaring PEFT's named arguments for one task class (what transformers' Trainer reads
    off the class to find label names); the arguments given are passed on to the model by name."""
    plain = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter("self", plain)]
        + [inspect.Parameter(n, plain, default=None) for n in (*names, "task_ids")]
        + [inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None),
           inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def forward(self, *args, **kwargs):
        if not args:  # the usual call, model(**inputs): nothing to bind to positions
            adapter_names = kwargs.pop("adapter_names", None)
            kwargs.pop("task_ids", None)
            return self._run(self.base_model.model, adapter_names, (),
                             {k: v for k, v in kwargs.items() if v is not None or k not in names})
        values = signature.bind(self, *args, **kwargs).arguments
        values.pop("self")
        values.pop("task_ids", None)  # PEFT's multitask prompt ids; nothing for LoRA
        adapter_names = values.pop("adapter_names", None)
        extra = values.pop("kwargs", {})
        inputs = {k: v for k, v in values.items() if v is not None}
        return self._run(self.base_model.model, adapter_names, (), {**inputs, **extra})

    forward.__signature__ = signature
    forward.__doc__ = "The model's forward with PEFT's named arguments; `adapter_names` mixes adapters in a batch."
    return forward_method(forward)


_TEXT = ("input_ids", "attention_mask", "inputs_embeds")
_OUTPUTS = ("output_attentions", "output_hidden_states", "return_dict")


class PeftModelForCausalLM(PeftModel):
    """A PeftModel over a causal language model (task_type CAUSAL_LM)."""

    forward = _task_forward(*_TEXT, "labels", *_OUTPUTS)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.base_model.model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel over a sequence classifier (task_type SEQ_CLS); the head trains in full."""

    forward = _task_forward(*_TEXT, "labels", *_OUTPUTS)


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel over a token classifier (task_type TOKEN_CLS)."""

    forward = _task_forward(*_TEXT, "labels", *_OUTPUTS)


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel over an encoder-decoder language model (task_type SEQ_2_SEQ_LM)."""

    forward = _task_forward(*_TEXT, "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds",
                            "labels", *_OUTPUTS)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.base_model.model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel over an extractive question-answering model (task_type QUESTION_ANS)."""

    forward = _task_forward("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                            "start_positions", "end_positions", *_OUTPUTS)


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel over an encoder returning hidden states (task_type FEATURE_EXTRACTION)."""

    forward = _task_forward(*_TEXT, *_OUTPUTS)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


# --- entry points ------------------------------------------------------------------------------------


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False, quantize: str | None = None, double_quant: bool = False,
                   compute_dtype: torch.dtype | None = None) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter: target layers wrapped, everything else frozen.

        peft_model = get_peft_model(base, config)                     # a PeftModelForCausalLM for CAUSAL_LM
        peft_model = get_peft_model(base, config, quantize="nf4")     # QLoRA

    The class returned follows `peft_config.task_type` as in PEFT (`PeftModel` when it is None).
    On a model that already holds adapters (e.g. a second call on the same base) this warns as
    PEFT does and adds the adapter to the ones there; an adapter of the same name is replaced
    whole, and every wrapper over that model then runs the new one (see `LoraModel.replace_adapter`).

    Args:
        model: The base model (modified in place).
        peft_config: The adapter's config.
        adapter_name: Its name. Default "default".
        mixed, autocast_adapter_dtype, revision: PEFT's arguments. `mixed=True` (PEFT's mixing of
            adapter types) is refused; adapters are float32 whatever `autocast_adapter_dtype`;
            `revision` is recorded nowhere (lorakit loads local folders only).
        low_cpu_mem_usage: Create the factors on the meta device (for weights loaded next).
        quantize: "nf4" first replaces every `nn.Linear` except the output head (and modules
            trained in full) by a frozen 4-bit `lorakit.quant.Linear4bit`. Default None.
        double_quant: With `quantize`, 8-bit quantize the NF4 scales too. Default False.
        compute_dtype: With `quantize`, the 4-bit layers' matmul dtype; None (default) uses
            each input's dtype.

    Raises:
        ConfigError, TargetError, TypeError: see `LoraConfig` and `LoraModel.add_adapter`
            (a TargetError is raised before anything is quantized).
        ValueError: an unknown `quantize` method, or `mixed=True`.
    """
    if mixed:
        raise ValueError("mixed=True (PEFT's PeftMixedModel, for mixing adapter types) is not supported: "
                         "lorakit has LoRA adapters only; several LoRA adapters on one model need no flag")
    if holds_adapters(model):
        warn_user(SECOND_INJECTION_WARNING)
    new_name, old_name = base_model_name(model), peft_config.base_model_name_or_path
    if new_name is not None and new_name != old_name:  # as PEFT: the model's own name wins
        if old_name is not None:
            warn_user(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.")
        peft_config = dataclasses.replace(peft_config, base_model_name_or_path=new_name)
    if quantize is not None:
        quantize_for_lora(model, peft_config, quantize, double_quant=double_quant, compute_dtype=compute_dtype)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Put LoRA layers into `model` in place and return it, without a PeftModel around it (PEFT's
    low-level API). Only the adapter's parameters are left trainable. `get_peft_model_state_dict`
    and `set_peft_model_state_dict` work on the result.

    Args:
        peft_config: The adapter's config.
        model: The model (modified in place).
        adapter_name: Its name. Default "default".
        low_cpu_mem_usage: Create the factors on the meta device (for weights loaded next).
        state_dict: Accepted for PEFT's signature (PEFT reads target names from it); unused.

    Raises:
        as `get_peft_model`.
    """
    LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return model


# --- PEFT's state-dict helpers (file keys: no adapter name) ------------------------------------------


def _lora_model_and_prefix(model: nn.Module, adapter_name: str) -> tuple[LoraModel, str]:
    """The LoraModel behind `model`, and the prefix its state-dict keys carry before the user
    model's paths: "base_model.model." for a PeftModel, "model." for a LoraModel, "" for a model
    adapters were injected into (`inject_adapter_in_model`)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, PeftModel):
        return model.base_model, adapter_format.KEY_PREFIX
    if isinstance(model, LoraModel):
        return model, "model."
    if not holds_adapters(model):
        raise ValueError(f"{type(model).__name__} holds no lorakit adapter; use get_peft_model or "
                         "inject_adapter_in_model first")
    return LoraModel(model, None, adapter_name), ""


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
    """An adapter's tensors under PEFT's keys (the parameter names without the adapter name), as
    `adapter_model.safetensors` holds them for a PeftModel.

    Args:
        model: A PeftModel, a LoraModel, or a model `inject_adapter_in_model` adapted.
        state_dict: The model's state dict to read from (e.g. gathered from shards). Default: the model's.
        adapter_name: Which adapter. Default "default".
        unwrap_compiled, save_embedding_layers: PEFT's arguments; compiled models are always
            unwrapped, and base embedding weights are never included.

    Raises:
        KeyError: no such adapter.
        ValueError: the model holds no adapter.
    """
    lora_model, prefix = _lora_model_and_prefix(model, adapter_name)
    lora_model.check_exists(adapter_name)
    state = None if state_dict is None else rekey(state_dict, prefix, "")
    return rekey(adapter_format.adapter_tensors(lora_model, adapter_name, state), adapter_format.KEY_PREFIX, prefix)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False):
    """Copy an adapter's tensors (keys as `get_peft_model_state_dict` gives them) into adapter
    `adapter_name`, after checking every key and shape; nothing changes if any is wrong.

    Returns:
        PEFT's `load_result` shape: an object with `missing_keys` and `unexpected_keys` (both
        empty: lorakit refuses a state dict that has either).

    Raises:
        AdapterLoadError: missing or unexpected keys, or a shape that does not fit (named).
        KeyError: no such adapter.
    """
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: a tensor that does not fit is an error")
    lora_model, prefix = _lora_model_and_prefix(model, adapter_name)
    lora_model.check_exists(adapter_name)
    outside = {k: v for k, v in peft_model_state_dict.items() if not k.startswith(prefix)}  # refused as unexpected
    tensors = {**rekey(peft_model_state_dict, prefix, adapter_format.KEY_PREFIX), **outside}
    adapter_format.load_weights(lora_model, adapter_name, tensors, source=f"state dict for {adapter_name!r}")
    return nn.modules.module._IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, subfolder: str | None = None,
                      **kwargs: Any) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors under their file keys (PEFT's helper), checked for NaN/inf.

    Raises:
        AdapterLoadError: the folder or its weights are missing or unreadable.
    """
    folder = resolve_adapter_dir(model_id, subfolder=subfolder, **kwargs)
    _, tensors = adapter_format.read_adapter(folder)
    return {k: v.to(device) for k, v in tensors.items()} if device else tensors
