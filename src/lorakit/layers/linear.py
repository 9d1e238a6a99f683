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
Merged, disabled, mixed-adapter (routing) and autocast forwards take the plain path.

A DoRA adapter (`AdapterSpec.use_dora`) keeps its magnitude in `lora_magnitude_vector[name]`
and takes DoRA's own paths (`layers.dora`): `dora.dora_linear` where LoRA would take the
Function, `dora_delta` (plain autograd) where LoRA would take `lora_delta`. Merging a DoRA
adapter rescales the rows of W + ΔW (see `merge`). A base layer needs a float `weight` for DoRA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import autograd, dora
from .base import AdapterSpec, LoraLayer


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like layer."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features, False
    # transformers' Conv1D: weight (in, out), attribute nf = out
    in_features, out_features = layer.weight.shape
    return in_features, out_features, True


def _plain_frozen_linear(layer: nn.Module) -> bool:
    """True for an nn.Linear (not a subclass) with a frozen weight and no hooks or patched forward,
    whose product `autograd.lora_linear` may therefore run itself."""
    from torch.nn.modules import module as torch_module

    return (type(layer) is nn.Linear and not layer.weight.requires_grad and "forward" not in layer.__dict__
            and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks or torch_module._global_forward_hooks
                     or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
                     or torch_module._global_backward_pre_hooks))


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

    factor_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_weight_init = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, detected = linear_shape(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or detected
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only: name -> dora.DoraMagnitude

    @property
    def supports_dora(self) -> bool:
        """DoRA needs the base weight: a 2-D float `weight` tensor."""
        weight = getattr(self.base_layer, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A[name] = factor_linear(self.in_features, spec.r, False, device, dtype)
        self.lora_B[name] = factor_linear(spec.r, self.out_features, spec.lora_bias, device, dtype)
        if spec.use_dora:
            self.lora_magnitude_vector[name] = dora.DoraMagnitude(self.out_features, device=device, dtype=dtype)

    def dora_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a transposed view for Conv1D)."""
        weight = self.base_weight
        return weight.t() if self.fan_in_fan_out else weight

    def init_magnitude(self, name: str) -> None:
        """m = ||W + ΔW||_row of the initialised adapter (||W|| when B = 0), as PEFT initialises it."""
        spec = self.adapters[name]
        with torch.no_grad():
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            norm = dora.weight_norm(self.dora_weight(), a, b, spec.scaling)  # (out,)
            self.lora_magnitude_vector[name].weight.copy_(norm)

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
        for i, name in enumerate(names):
            spec = self.adapters[name]
            if spec.use_dora and self.base_weight.requires_grad:  # a trained base weight: plain ops carry its grad
                result = (result + self.dora_delta(x, name, result)).to(result.dtype)
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            p = spec.dropout if self.training else 0.0
            seed = autograd.draw_seed() if p > 0 else None
            if spec.use_dora:  # DoRA's own Function (layers/dora.py)
                result = dora.dora_linear(result, x, a.weight, b.weight, self.lora_magnitude_vector[name].weight,
                                          self.dora_weight(), getattr(base, "bias", None), spec.scaling, p, seed)
            elif owned and i == 0:
                result = autograd.lora_linear(None, x, a.weight, b.weight, b.bias, spec.scaling, p, seed,
                                              weight=base.weight, bias=base.bias)
            else:
                result = autograd.lora_linear(result, x, a.weight, b.weight, b.bias, spec.scaling, p, seed)
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

    def dora_delta(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adapter `name` adds to `result` (the output so far), in plain ops (`dora.dora_delta`)."""
        spec = self.adapters[name]
        p = spec.dropout if self.training else 0.0
        return dora.dora_delta(x, result, self.dora_weight(), getattr(self.base_layer, "bias", None),
                               self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name].weight,
                               spec.scaling, p)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling · B A in float32, in the base weight's layout (for DoRA too: the LoRA part only)."""
        spec = self.adapters[name]
        a = self.lora_A[name].weight.detach().float()  # (r, in)
        b = self.lora_B[name].weight.detach().float()  # (out, r)
        delta = (b @ a) * spec.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    # --- merging, DoRA included -----------------------------------------------------------------

    def _dora_norms(self, names: list[str]) -> dict[str, torch.Tensor]:
        """n = ||W0 + ΔW||_row, (out,) float32, of each DoRA adapter among `names`, W0 being the base
        weight with every merged adapter taken out: the n the unmerged forward uses (as in PEFT)."""
        todo = [n for n in names if self.adapters[n].use_dora]
        if not todo:
            return {}
        w0 = self.unmerged_weight()
        w0 = w0.t() if self.fan_in_fan_out else w0  # (out, in)
        return {n: dora.weight_norm(w0, self.lora_A[n].weight.detach().float(), self.lora_B[n].weight.detach().float(),
                                    self.adapters[n].scaling) for n in todo}

    def merged_weight(self, names: list[str], norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The base weight with adapters folded in, in float32 (not written back): W + ΔW for
        LoRA, (m / n) ⊙ (W + ΔW) row-wise for DoRA, in the order of `names`.

        Args:
            names: Adapters to fold in.
            norms: n of the DoRA adapters among them. Default: computed (see `_dora_norms`).
        """
        norms = self._dora_norms(names) if norms is None else norms
        weight = self.base_weight.detach().float()
        for name in names:
            if name in norms:
                factor = self.lora_magnitude_vector[name].weight.detach().float() / norms[name]  # (out,)
                weight = dora.merge_weight(weight, self.delta_weight(name), factor, self.fan_in_fan_out)
            else:
                weight = weight + self.delta_weight(name)
        return weight

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out, in float32 (not written back)."""
        weight = self.base_weight.detach().float()
        for name in reversed(self.merged_adapters):
            if self.adapters[name].use_dora:
                record = self.lora_magnitude_vector[name]
                factor = record.weight.detach().float() / record.merged_norm  # (out,)
                weight = dora.unmerge_weight(weight, self.delta_weight(name), factor, self.fan_in_fan_out)
            else:
                weight = weight - self.delta_weight(name)
        return weight

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, in float32, cast back to W's dtype.

        LoRA: W += ΔW. DoRA: W = (m / n) ⊙ (W + ΔW), with n from the unmerged weight (kept for
        `unmerge`; a merged layer computes exactly what the unmerged one did).
        """
        todo = [n for n in names if n not in self.merged_adapters]
        norms = self._dora_norms(todo)
        if not norms:
            super().merge(names)
            return
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_(self.merged_weight(todo, norms).to(weight.dtype))
            self._merge_bias(todo, +1.0)
        for name, norm in norms.items():
            self.lora_magnitude_vector[name].merged_norm = norm
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Undo every merge in float32: W -= ΔW for LoRA, W = W' / (m / n) - ΔW for DoRA (exact up
        to float32 rounding)."""
        if not self.merged_adapters:
            return
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_(self.unmerged_weight().to(weight.dtype))
            self._merge_bias(self.merged_adapters, -1.0)
        for name in self.merged_adapters:
            if self.adapters[name].use_dora:
                self.lora_magnitude_vector[name].merged_norm = None
        self.merged_adapters = []
