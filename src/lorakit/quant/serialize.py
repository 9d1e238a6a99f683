"""A quantized base model on disk, reloaded without quantizing again.

    save_quantized(peft_model, "out/base-nf4")      # the 4-bit base; the adapter goes through save_pretrained
    base = load_quantized("out/base-nf4")           # same packed codes, same outputs, no quantize_nf4 call

Folder layout (written into a temporary folder beside it, then renamed into place):

    model.safetensors    every tensor of the base model; a 4-bit layer contributes its packed
                         `weight` (uint8), `weight_absmax` (and with double quant
                         `weight_absmax_scale`, `weight_absmax_offset`) and its bias
    quantization.json    {"format": "lorakit-nf4", "version": 1,
                          "layers": {path: {in_features, out_features, bias, blocksize,
                                            double_quant, compute_dtype, orig_dtype}},
                          "tied": {alias key: saved key}}
    config.json ...      the transformers config (and generation config) when the model has one,
                         so `load_quantized` can rebuild the architecture on its own
    tokenizer files      when a tokenizer is given

Given a `PeftModel`/`LoraModel`, the base model is saved: LoRA wrappers are looked through
(`q_proj.base_layer.weight` is saved as `q_proj.weight`), adapter tensors are left out.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapter_format import is_adapter_tensor
from lorakit.quant.linear4bit import Linear4bit

__all__ = ["FORMAT", "QUANT_CONFIG_NAME", "WEIGHTS_NAME", "load_quantized", "save_quantized"]

FORMAT = "lorakit-nf4"
VERSION = 1
QUANT_CONFIG_NAME = "quantization.json"
WEIGHTS_NAME = "model.safetensors"

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _base_module(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel / LoraModel, or `model` itself."""
    from lorakit.model import LoraModel
    from lorakit.peft_model import PeftModel

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, LoraModel) else model


def _base_key(key: str) -> str:
    """`a.q_proj.base_layer.weight` -> `a.q_proj.weight`; `head.original_module.w` -> `head.w`."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict as the unwrapped model would have it (adapter tensors dropped).

    Raises:
        ValueError: an adapter is merged into a base weight (the base would not be the base).
    """
    from lorakit.layers import LoraLayer

    module = _base_module(model)
    merged = [p for p, m in module.named_modules() if isinstance(m, LoraLayer) and m.merged_adapters]
    if merged:
        raise ValueError(f"an adapter is merged into {merged[0]} (and {len(merged) - 1} more); "
                         "unmerge_adapter() before saving the base model")
    return {_base_key(k): v for k, v in module.state_dict(keep_vars=True).items() if not is_adapter_tensor(k)}


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Settings of every 4-bit layer, by its path in the unwrapped model."""
    layers = {}
    for path, module in _base_module(model).named_modules():
        if isinstance(module, Linear4bit):
            layers[_base_key(path + ".").rstrip(".")] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "blocksize": module.blocksize,
                "double_quant": module.double_quant,
                "compute_dtype": _dtype_name(module.compute_dtype),
                "orig_dtype": _dtype_name(module.orig_dtype),
            }
    return layers


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write (one per storage) and {alias: saved key} for tied ones.

    Raises:
        ValueError: a tensor is on the meta device (nothing to save).
    """
    kept: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ValueError(f"{key} is on the meta device: load the model's weights before saving it")
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and ident in kept:
            tied[key] = kept[ident]
            continue
        kept[ident] = key
        tensors[key] = tensor.to("cpu").contiguous()
    return tensors, tied


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
                   overwrite: bool = False) -> Path:
    """Write a model with 4-bit layers so that `load_quantized` restores it without quantizing.

    Args:
        model: A model holding `Linear4bit` layers, or a PeftModel/LoraModel around one (its
            base is saved; save the adapter with `save_pretrained`).
        directory: Folder to create. It must not exist or be empty unless `overwrite`.
        tokenizer: Saved into the folder too when given (anything with `save_pretrained`).
        overwrite: Replace an existing non-empty folder (the old one is removed only after
            the new one is in place).

    Returns:
        The folder written.

    Raises:
        ValueError: the model has no 4-bit layer, an adapter is merged into the base, a tensor
            is on the meta device, or the folder exists and `overwrite` is False.
    """
    from lorakit.files import staged_directory

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no 4-bit layer; quantize it first (get_peft_model(..., quantize='nf4') "
                         "or lorakit.quant.quantize_model) or save it with save_pretrained")
    tensors, tied = _dedupe(base_state(model))
    settings = {"format": FORMAT, "version": VERSION, "layers": layers, "tied": tied}
    base = _base_module(model)
    with staged_directory(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / QUANT_CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        config = getattr(base, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config = copy.deepcopy(config)
            config.architectures = [type(base).__name__]  # what load_quantized rebuilds
            config.save_pretrained(tmp)
            generation_config = getattr(base, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def read_settings(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check `<directory>/quantization.json`.

    Raises:
        ValueError: missing, not JSON, or not this format and version.
    """
    path = Path(directory) / QUANT_CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: {directory} is not a folder written by save_quantized")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(settings, dict) or settings.get("format") != FORMAT or settings.get("version") != VERSION:
        raise ValueError(f"{path}: expected format {FORMAT!r} version {VERSION}, "
                         f"got {settings.get('format')!r} version {settings.get('version')!r}")
    return settings


def _skeleton(directory: Path) -> nn.Module:
    """The transformers model described by `<directory>/config.json`, parameters on meta.

    Raises:
        ValueError: no config.json, or its architecture is not a transformers class.
    """
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json; pass the model to fill (model=...) to load_quantized")
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(f"{directory}/config.json names no transformers architecture ({architectures}); "
                         "pass the model to fill (model=...) to load_quantized")
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = cls(config)
    generation_file = directory / "generation_config.json"
    if generation_file.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very same Parameter/buffer object as its saved key."""
    for alias, source in tied.items():
        parent_path, _, leaf = alias.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        src_parent_path, _, src_leaf = source.rpartition(".")
        src_parent = model.get_submodule(src_parent_path) if src_parent_path else model
        if src_leaf in src_parent._parameters:
            setattr(parent, leaf, src_parent._parameters[src_leaf])
        else:
            parent._buffers[leaf] = src_parent._buffers[src_leaf]


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized`, its 4-bit layers filled from the file as is.

    No weight is quantized: the packed codes and scales are the saved bytes, so the outputs
    are those of the saved model.

    Args:
        directory: The folder.
        model: The model to fill, e.g. built on the meta device; its listed layers are replaced
            by empty 4-bit layers first. Default None: rebuilt from the folder's config.json
            (a transformers model).
        device: Where to put the model; None (default) leaves it on the CPU.

    Returns:
        The model, in eval mode, every parameter frozen.

    Raises:
        ValueError: the folder is not a save_quantized folder, a listed layer is missing from
            the model or is not linear, or the weights do not fit the model (names, shapes).
    """
    directory = Path(directory)
    settings = read_settings(directory)
    weights = directory / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    if model is None:
        model = _skeleton(directory)
    for path, layer in settings["layers"].items():
        try:
            old = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"{directory}: layer {path} is not in the model") from err
        if not isinstance(old, (nn.Linear, Linear4bit)):
            raise ValueError(f"{directory}: {path} is a {type(old).__name__} in the model, not a linear layer")
        new = Linear4bit(layer["in_features"], layer["out_features"], bias=layer["bias"],
                         blocksize=layer["blocksize"], double_quant=layer["double_quant"],
                         compute_dtype=_DTYPES.get(layer["compute_dtype"]),
                         orig_dtype=_DTYPES[layer["orig_dtype"]], device="meta")
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
    tied = settings.get("tied", {})
    state = {**tensors, **{alias: tensors[source] for alias, source in tied.items() if source in tensors}}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the model: {err}") from err
    _retie(model, tied)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{weights} left {len(on_meta)} tensors unset (e.g. {on_meta[0]})")
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model.eval()
