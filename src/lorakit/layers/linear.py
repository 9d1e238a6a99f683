"""LoRA on a linear map: `nn.Linear`, GPT-2's `Conv1D`, and any layer with the same interface.

    y = base(x) + scaling · B(A(dropout(x)))      x: (..., in), A: (r, in), B: (out, r)

GPT-2's Conv1D stores its weight as (in, out) (`fan_in_fan_out`); its factors have the same
shapes as for nn.Linear and only ΔW is transposed when merging. A base layer that is not an
nn.Linear (e.g. the 4-bit layer) works too if it has `in_features` and `out_features`; merging
needs a float `weight` (`LoraLayer.mergeable`).

The forward runs the update through `autograd.lora_linear` (a hand-written autograd Function
that keeps no activation of its own, see autograd.py) unless the plain path is selected
(`autograd.set_lora_path("plain")` or LORAKIT_LORA_PATH=plain), in which case it is
`base(x) + lora_delta(x)` in plain autograd ops: the reference both paths are tested against.
Merged, disabled and autocast forwards take the plain path; a mixed-adapter forward is
`routing`'s (the stacked product of `layers.stacked`, or the plain path per adapter group).

Each adapter's forward and merge go through its variant (`layers.variant`): plain LoRA's is
the Function above; DoRA's (`layers.dora.DoraVariant`) keeps a magnitude per output row in
`lora_magnitude_vector[name]` and rescales the rows of W + ΔW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import autograd
from .base import AdapterSpec, LoraLayer


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features, False
    # transformers' Conv1D: weight (in, out), attribute nf = out
    in_features, out_features = layer.weight.shape
    return in_features, out_features, True


def plain_linear(layer: nn.Module) -> bool:
    """True for an nn.Linear (not a subclass) with no hooks, patched forward or `Module.compile`,
    and a plain-tensor weight (not a DTensor or quantized subclass): its forward is exactly
    `F.linear(x, weight, bias)`, so a caller may run that product itself (fused with its own
    work). Cheap enough to ask on every forward (hooks come and go)."""
    from torch.nn.modules import module as torch_module

    return (type(layer) is nn.Linear and "forward" not in layer.__dict__
            and getattr(layer, "_compiled_call_impl", None) is None
            and type(layer.weight) in (torch.Tensor, nn.Parameter)
            and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks or torch_module._global_forward_hooks
                     or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
                     or torch_module._global_backward_pre_hooks))


def _plain_frozen_linear(layer: nn.Module) -> bool:
    """A `plain_linear` with a frozen weight, whose product `autograd.lora_linear` may therefore run itself."""
    return plain_linear(layer) and not layer.weight.requires_grad


def factor_linear(in_features: int, out_features: int, bias: bool, device: torch.device,
                  dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear for a LoRA factor. On the meta device it skips nn.Linear's init, which is
    pure overhead there (adapters about to be loaded from a file are built that way)."""
    if device.type != "meta":
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    layer.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None)
    return layer


class Linear(LoraLayer):
    """LoRA wrapper for nn.Linear and Conv1D.

    Args:
        base_layer: The frozen linear layer.
        fan_in_fan_out: True when the base weight is stored (in, out). Detected for Conv1D.
    """

    supports_weight_init = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, detected = linear_shape(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or detected
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[name] = factor_linear(self.in_features, spec.r, False, device, dtype)
        self.lora_B[name] = factor_linear(spec.r, self.out_features, spec.lora_bias, device, dtype)

    def weight_out_in(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` (default: the base weight) as (out, in): a transposed view for Conv1D."""
        weight = self.base_weight if weight is None else weight
        return weight.t() if self.fan_in_fan_out else weight

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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) plus each active adapter's update; see the module docstring for the two paths."""
        if (self.disabled or self.merged_adapters or self.routing is not None or not self.active_adapters
                or autograd.get_lora_path() == "plain" or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x, *args, **kwargs)  # (under autocast too: its casts are per op)
        base, names = self.base_layer, self.active_adapters
        # A frozen, hook-free nn.Linear's product runs inside the Function of the first adapter.
        owned = not args and not kwargs and _plain_frozen_linear(base)
        result = None if owned else base(x, *args, **kwargs)  # (..., out)
        for name in names:
            result = self.variant(name).linear_forward(self, x, name, result)
        return result

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The LoRA path's output for adapter `name` (dropout included), already scaled, in plain ops.

        Dropout draws its positions from `autograd.draw_seed()`, as the Function path does, so
        both paths drop the same elements after the same `torch.manual_seed`.
        """
        spec = self.adapters[name]
        a, b = self.lora_A[name], self.lora_B[name]
        x = autograd.dropout(x.to(a.weight.dtype), spec.dropout, self.training)  # (..., in)
        return b(a(x)) * spec.scaling  # (..., r) -> (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling · B A in float32, in the base weight's layout (for every variant: the LoRA part)."""
        spec = self.adapters[name]
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        delta = (b @ a) * spec.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta
