"""LoRA on a linear map: `nn.Linear`, GPT-2's `Conv1D`, and any layer with the same interface.

    y = base(x) + scaling · B(A(dropout(x)))      x: (..., in), A: (r, in), B: (out, r)

GPT-2's Conv1D stores its weight as (in, out) (`fan_in_fan_out`); its factors have the same
shapes as for nn.Linear and only ΔW is transposed when merging. A base layer that is not an
nn.Linear (e.g. the 4-bit layer) works too if it has `in_features`, `out_features` and either
a `weight` or a `merge_delta(delta)` method.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterSpec, LoraLayer, dropout


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features, False
    # transformers' Conv1D: weight (in, out), attribute nf = out
    in_features, out_features = layer.weight.shape
    return in_features, out_features, True


class Linear(LoraLayer):
    """LoRA wrapper for nn.Linear and Conv1D.

    Args:
        base_layer: The frozen linear layer.
        fan_in_fan_out: True when the base weight is stored (in, out). Detected for Conv1D.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, detected = linear_shape(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or detected
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(spec.r, self.out_features, bias=spec.lora_bias, device=device, dtype=dtype)

    def _reset_factors(self, name: str, init: bool | str) -> None:
        a, b = self.lora_A[name], self.lora_B[name]
        if init is False:
            return  # both keep nn.Linear's random init: the adapter is not a no-op (for tests)
        if init == "gaussian":
            nn.init.normal_(a.weight, std=1 / self.adapters[name].r)
        else:  # kaiming-uniform with a=sqrt(5): uniform in ±1/sqrt(in_features)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.adapters[name]
        a, b = self.lora_A[name], self.lora_B[name]
        x = dropout(x.to(a.weight.dtype), spec.dropout, self.training)  # (..., in)
        return b(a(x)) * spec.scaling  # (..., r) -> (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        spec = self.adapters[name]
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        delta = (b @ a) * spec.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta
