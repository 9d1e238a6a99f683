"""QUANTIZERS: the quantized base-layer formats LoRA can train on, by name.

    QUANTIZERS["nf4"].quantize_model(model, skip={"lm_head"}, double_quant=True)

A format is one `Quantizer` record: the frozen layer type it stores weights in, how to quantize
a model's Linears into it, the LoRA wrapper its layers get, how a LoRA model on it is merged
(dequantized) for unloading, how many bytes one stored weight takes and how many parameters a
layer stands for. The layer dispatcher, targeting, merging, parameter counting and the memory
estimate ask this registry; none of them names a format. A new format is its own module plus
one `register(Quantizer(...))` (lorakit.quant registers "nf4").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from lorakit.layers import LoraLayer


@dataclass(frozen=True)
class Quantizer:
    """One quantized weight format.

    Attributes:
        name: What `get_peft_model(quantize=...)` and `--quantize` take, e.g. "nf4".
        layer_type: The frozen quantized layer replacing an `nn.Linear`.
        quantize_model: (model, skip: set of module paths, double_quant, compute_dtype) -> the
            model, every `nn.Linear` outside `skip` replaced in place.
        wrap: The LoRA wrapper of one quantized layer.
        dequantized_layers: (lora_model, adapter_names, safe_merge, dtype) -> {module path: the
            float `nn.Linear` replacing that quantized layer (adapters merged in)}, computed
            without changing the model (`LoraModel.merge_and_unload` puts them in, with rollback).
        weight_bytes: (numel, double_quant) -> bytes of one stored weight, scales included.
        logical_numel: Parameters a quantized layer stands for (its float weight's numel), which
            parameter counts add since the packed storage is not a parameter.
        shardable: (layer) -> None: turn the layer's packed storage and scales into frozen
            parameters, so that FSDP shards them across ranks (it shards parameters only).
            Parameter counts taken afterwards include those bytes as parameters.
    """

    name: str
    layer_type: type[nn.Module]
    quantize_model: Callable[..., nn.Module]
    wrap: Callable[[nn.Module], LoraLayer]
    dequantized_layers: Callable[..., dict[str, nn.Module]]
    weight_bytes: Callable[[int, bool], float]
    logical_numel: Callable[[nn.Module], int]
    shardable: Callable[[nn.Module], None] | None = None


QUANTIZERS: dict[str, Quantizer] = {}


def register(quantizer: Quantizer) -> None:
    """Add (or replace) a format under `quantizer.name`."""
    QUANTIZERS[quantizer.name] = quantizer


def get(name: str) -> Quantizer:
    """The format named `name`.

    Raises:
        ValueError: no such format (the message lists those there are).
    """
    if name not in QUANTIZERS:
        raise ValueError(f"quantize={name!r} is not supported; choose one of {tuple(QUANTIZERS)}")
    return QUANTIZERS[name]


def quantizer_of(module: nn.Module) -> Quantizer | None:
    """The format `module` is a layer of, or None for a float layer."""
    return next((q for q in QUANTIZERS.values() if isinstance(module, q.layer_type)), None)


def model_quantizer(model: nn.Module) -> Quantizer | None:
    """The format of the first quantized layer in `model` (wrapped by LoRA or not), or None."""
    return next((q for q in map(quantizer_of, model.modules()) if q is not None), None)


def layer_types() -> tuple[type[nn.Module], ...]:
    """Every registered quantized layer type."""
    return tuple(q.layer_type for q in QUANTIZERS.values())


def make_shardable(model: nn.Module) -> None:
    """Prepare every quantized layer of `model` for FSDP (its format's `shardable`).

    Raises:
        ValueError: a quantized layer's format cannot be sharded.
    """
    for module in model.modules():
        quantizer = quantizer_of(module)
        if quantizer is None:
            continue
        if quantizer.shardable is None:
            raise ValueError(f"the {quantizer.name} format cannot be sharded with FSDP; use --strategy ddp")
        quantizer.shardable(module)
