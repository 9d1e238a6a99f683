"""The LoRA core every layer wrapper shares: adapters, their records, merging.

A wrapper holds the frozen `base_layer` and, per adapter, two small trainable factors
(`lora_A`, `lora_B`) whose product is the low-rank update

    ΔW = scaling · B @ A,    A: (r, in), B: (out, r), scaling = lora_alpha / r

(lora_alpha / sqrt(r) with rsLoRA). Everything else about an adapter in a layer (rank,
alpha, dropout) lives in one small `AdapterSpec` record, not in parallel dicts.

Subclasses (Linear, Embedding, Conv) implement four things: how to create the factors,
how to reset them, the LoRA path of the forward, and ΔW in the base weight's layout. What an
adapter does beyond plain LoRA (DoRA's magnitude, say) belongs to its variant
(`AdapterSpec.variant`, see `layers.variant`), which this class calls and never branches on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .variant import PLAIN, VARIANTS, LoraVariant


class QuantizedMergeError(ValueError):
    """An adapter cannot be merged into a quantized base weight (nothing was merged)."""


@dataclass(frozen=True)
class AdapterSpec:
    """What one layer knows about one adapter.

    Args:
        r: Rank.
        alpha: lora_alpha.
        dropout: Dropout probability applied to the LoRA path's input.
        use_rslora: Scale by alpha / sqrt(r) instead of alpha / r.
        lora_bias: lora_B has a bias.
        variant: Name of its variant in `layers.variant.VARIANTS`: "lora" (plain LoRA,
            the default) or e.g. "dora" (see `layers.dora`).
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    lora_bias: bool = False
    variant: str = PLAIN

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLayer(nn.Module):
    """A frozen base layer plus any number of named LoRA adapters.

    Attributes:
        base_layer: The wrapped module, frozen.
        adapters: name -> AdapterSpec, one record per adapter.
        active_adapters: Names whose LoRA path runs in forward (usually one).
        merged_adapters: Names currently folded into the base weight.
        disabled: When True, forward is the base layer alone.
    """

    # Names of the attributes holding per-adapter factors, e.g. ("lora_A", "lora_B").
    factor_names: tuple[str, ...] = ("lora_A", "lora_B")
    # Whether PiSSA/OLoRA (`layers.init`, factors taken from the base weight) apply (linear layers set it).
    supports_weight_init: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set by LoraModel while a mixed-adapter batch runs: a routing record shared by all layers.
        self.routing = None

    # --- to be provided by each layer type ---------------------------------------------------

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _reset_factors(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The LoRA path's output for adapter `name` (dropout included), already scaled."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in float32, in the layout and shape of the base weight."""
        raise NotImplementedError

    # --- adapters ---------------------------------------------------------------------------

    def variant(self, name: str) -> LoraVariant:
        """The variant of adapter `name` (see `layers.variant`)."""
        return VARIANTS[self.adapters[name].variant]

    def containers(self, name: str) -> tuple[str, ...]:
        """Attributes holding adapter `name`'s parameters: the factors', then its variant's."""
        return self.factor_names + self.variant(name).containers

    def variant_store(self, attr: str) -> nn.ModuleDict:
        """The ModuleDict `attr` of per-adapter parameters a variant adds, created on first use."""
        if not isinstance(getattr(self, attr, None), nn.ModuleDict):
            setattr(self, attr, nn.ModuleDict())
        return getattr(self, attr)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def mergeable(self) -> bool:
        """Whether ΔW can be added to the base weight in place: a floating-point weight (not, e.g.,
        the packed uint8 storage of a layer loaded with bitsandbytes' 4-bit quantization)."""
        weight = getattr(self.base_layer, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.is_floating_point()

    @property
    def merge_refusal(self) -> str:
        """Why `merge` is refused here (read when `mergeable` is False)."""
        weight = getattr(self.base_layer, "weight", None)
        kind = f"{type(self.base_layer).__module__}.{type(self.base_layer).__name__}"
        return (f"the base layer ({kind}, weight dtype {getattr(weight, 'dtype', None)}) holds no float weight, so an "
                "adapter cannot be merged into it (a base loaded quantized, e.g. with bitsandbytes); load the base in "
                "float to merge, or quantize with lorakit (get_peft_model(..., quantize='nf4')), whose "
                "merge_and_unload dequantizes")

    def add_adapter(self, name: str, spec: AdapterSpec, init: bool | str = True) -> None:
        """Create adapter `name`'s factors (float32 unless the base is float64) and initialise them.

        `init` is `LoraConfig.init_lora_weights`. The inits taken from the base weight ("pissa",
        "pissa_niter_K", "olora") run in `layers.init` and also replace the base weight by the
        residual; the others are the layer type's `_reset_factors`. On the meta device nothing
        is initialised. `init=None` creates the factors on the meta device (no memory, no init
        kernels), for a caller that loads them from a file next (`adapter_format.load_weights` replaces
        them by the file's tensors on the base weight's device).

        The variant's parameters (`spec.variant`, e.g. DoRA's magnitude) are set last, from the
        initialised factors (and the residual base weight after a weight-derived init), as PEFT
        does.

        Raises:
            ValueError: the name exists in this layer, a weight-derived init does not apply
                to this layer (see `layers.init.check_layer`), or the variant does not apply to
                it (`LoraVariant.check`; nothing is changed then).
        """
        from . import init as weight_init

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        variant = VARIANTS[spec.variant]
        variant.check(self)
        weight = self.base_weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        from_weight = weight_init.rewrites_base_weight(init)
        if from_weight:
            weight_init.check_layer(self, spec, init)
        self.adapters[name] = spec
        device = torch.device("meta") if init is None else weight.device
        self._create_factors(name, spec, device, dtype)
        variant.create(self, name, spec, device, dtype)
        if device.type == "meta":
            return
        if from_weight:
            weight_init.init_from_weight(self, name, init)
        else:
            self._reset_factors(name, init)
        variant.init(self, name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        if name not in self.adapters:
            return
        for attr in self.containers(name):
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.adapters.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def rename_adapter(self, old: str, new: str) -> None:
        """Give adapter `old` the name `new` (a free name): its factors, record and flags move over."""
        if new in self.adapters:
            raise ValueError(f"adapter {new!r} already exists in this layer")
        for attr in self.containers(old):
            container = getattr(self, attr)
            if old in container:
                container[new] = container.pop(old)
        self.adapters = {new if n == old else n: spec for n, spec in self.adapters.items()}
        self.active_adapters = [new if n == old else n for n in self.active_adapters]
        self.merged_adapters = [new if n == old else n for n in self.merged_adapters]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.containers(name):
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is not None and not (self.disabled or self.merged_adapters):
            return self.routing.forward(self, x, *args, **kwargs)  # the base layer's product included
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            result = result + self.variant(name).delta(self, x, name, result)
        return result.to(out_dtype)

    # --- merging ------------------------------------------------------------------------------

    def merged_weight(self, names: list[str], commit: bool = False) -> torch.Tensor:
        """The base weight with adapters `names` folded in by their variants, in float32, in the
        order of `names` (not written back; `commit`: the caller writes it back, see
        `LoraVariant.merge`)."""
        unmerged: list[torch.Tensor] = []

        def unmerged_weight() -> torch.Tensor:
            if not unmerged:
                unmerged.append(self.unmerged_weight())
            return unmerged[0]

        weight = self.base_weight.detach().float()
        for name in names:
            weight = self.variant(name).merge(self, name, weight, unmerged_weight, commit)
        return weight

    def unmerged_weight(self, commit: bool = False) -> torch.Tensor:
        """The base weight with every merged adapter taken out, in float32 (not written back;
        `commit`: the caller writes it back, see `LoraVariant.unmerge`)."""
        weight = self.base_weight.detach().float()
        for name in reversed(self.merged_adapters):
            weight = self.variant(name).unmerge(self, name, weight, commit)
        return weight

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, in float32, cast back to W's dtype: W += ΔW for
        plain LoRA (each variant's `merge`; a merged layer computes what the unmerged one did)."""
        todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            return
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_(self.merged_weight(todo, commit=True).to(weight.dtype))
            self._merge_bias(todo, +1.0)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Undo every merge in float32: W -= ΔW for plain LoRA (exact in fp32; in bf16 within one
        rounding)."""
        if not self.merged_adapters:
            return
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_(self.unmerged_weight(commit=True).to(weight.dtype))
            self._merge_bias(self.merged_adapters, -1.0)
        self.merged_adapters = []

    def restore_merge_state(self, merged: list[str]) -> None:
        """After a failed merge whose weights were put back by copy: `merged` are the adapters
        merged again, and every other adapter's variant forgets what its merge kept."""
        for name in self.adapters:
            if name not in merged:
                self.variant(name).forget_merge(self, name)
        self.merged_adapters = list(merged)

    def _merge_bias(self, names: list[str], sign: float) -> None:
        """Add (sign=+1) or remove (-1) lora_B's bias, scaled, to the base bias."""
        for name in names:
            spec = self.adapters[name]
            if not spec.lora_bias:
                continue
            bias = self.base_layer.bias
            if bias is None:
                raise ValueError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge into")
            lora_b = self.lora_B[name].bias
            bias.copy_((bias.float() + sign * spec.scaling * lora_b.float()).to(bias.dtype))



def check_finite_merge(layers: list[tuple[str, LoraLayer]], names: list[str]) -> None:
    """safe_merge's check, before any weight changes: every merged weight must be finite.

    Raises:
        ValueError: naming the first layer whose merge would hold NaN or inf.
    """
    for path, layer in layers:
        present = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
        if present and not torch.isfinite(layer.merged_weight(present)).all():
            raise ValueError(f"safe_merge: merging {present} into {path} gives NaN or inf; nothing was merged")
