"""Which LoRA wrapper each base layer type gets.

Quantized layers get their format's wrapper (`lorakit.quant.registry`); every other layer type
is looked up in one table, checked in order. A user's custom layer is one `register` call:

    register(MyLinear, lambda layer, config: Linear(layer))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from .config import LoraConfig
from .layers import Conv, Embedding, Linear, LoraLayer
from .quant.registry import layer_types, quantizer_of

Factory = Callable[[nn.Module, LoraConfig], LoraLayer]

def _linear(layer: nn.Module, config: LoraConfig) -> LoraLayer:
    """nn.Linear stores its weight (out, in): `fan_in_fan_out` is corrected to False, as PEFT does."""
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.", stacklevel=2)
    return Linear(layer, fan_in_fan_out=False)


_REGISTRY: list[tuple[type[nn.Module], Factory]] = [
    (nn.Linear, _linear),
    (nn.Embedding, lambda layer, config: Embedding(layer)),
    (nn.Conv1d, lambda layer, config: Conv(layer)),
    (nn.Conv2d, lambda layer, config: Conv(layer)),
    (nn.Conv3d, lambda layer, config: Conv(layer)),
]


def register(layer_type: type[nn.Module], factory: Factory) -> None:
    """Give `layer_type` (and its subclasses) a wrapper; later registrations take precedence."""
    _REGISTRY.insert(0, (layer_type, factory))


def conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 `Conv1D` (a linear layer with an (in, out) weight), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def supported_types() -> list[type[nn.Module]]:
    """Every base layer type LoRA can wrap."""
    types = [t for t, _ in _REGISTRY] + list(layer_types())
    conv1d = conv1d_type()
    return types + ([conv1d] if conv1d else [])


def wrap(layer: nn.Module, config: LoraConfig) -> LoraLayer:
    """A LoRA wrapper around `layer` with no adapters yet.

    Raises:
        TypeError: no wrapper is registered for the layer's type.
    """
    quantizer = quantizer_of(layer)
    if quantizer is not None:
        return quantizer.wrap(layer)
    for layer_type, factory in _REGISTRY:
        if isinstance(layer, layer_type):
            return factory(layer, config)
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):  # weight stored (in, out): corrected as PEFT does
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", stacklevel=2)
        return Linear(layer, fan_in_fan_out=True)
    names = ", ".join(sorted({t.__name__ for t in supported_types()}))
    raise TypeError(f"LoRA cannot wrap a {type(layer).__name__}; supported layer types: {names}")
