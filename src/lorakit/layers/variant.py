"""LoRA variants: what an adapter does beyond y = base(x) + s · B A x, behind one small interface.

A variant is chosen once per adapter from its config (`choose_variant`, the only place that
reads a config's variant switches such as `use_dora`) and recorded by name in
`AdapterSpec.variant`. A layer never branches on the variant: it asks the variant object

    check(layer)                             can this layer take it? (raises ValueError)
    create(layer, name, spec, device, dtype) the parameters it adds, in `containers`
    init(layer, name)                        set them, once the factors are initialised
    delta(layer, x, name, result)            the update to add to the output (plain autograd)
    linear_forward(layer, x, name, result)   the output on a Linear's training path
    merge(layer, name, weight, unmerged, commit) / unmerge(layer, name, weight, commit)   ΔW in / out

`LoraVariant` is plain LoRA and the base of every other variant; `layers.dora.DoraVariant` is
DoRA. Adding a variant is one new file with a subclass, plus `register_variant` in
`layers/__init__.py`. Its extra state keys are `<module>.<container>.<adapter>...`, which
`adapter_format` maps to files as it does lora_A/lora_B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

from . import autograd

if TYPE_CHECKING:
    from .base import AdapterSpec, LoraLayer

PLAIN = "lora"


class LoraVariant:
    """Plain LoRA: no extra parameters; ΔW = s · B A added to the output and to the weight.

    Attributes:
        name: The name recorded in `AdapterSpec.variant`.
        title: How messages name it.
        containers: Names of the per-adapter containers (e.g. ModuleDicts) it adds to a layer.
        reads_output: Whether `delta` reads the output so far (`result`); when False callers
            may pass None.
    """

    name: ClassVar[str] = PLAIN
    title: ClassVar[str] = "LoRA"
    containers: ClassVar[tuple[str, ...]] = ()
    reads_output: ClassVar[bool] = False

    def selected_by(self, config) -> bool:
        """Whether `config` (a LoraConfig) asks for this variant. Plain LoRA is the default."""
        return False

    def check(self, layer: LoraLayer) -> None:
        """Raise unless `layer` can take an adapter of this variant (plain LoRA: every layer).

        Raises:
            ValueError: naming the variant and the layer type.
        """

    def create(self, layer: LoraLayer, name: str, spec: AdapterSpec, device: torch.device,
               dtype: torch.dtype) -> None:
        """Add adapter `name`'s extra parameters to `layer` (after its factors; uninitialised)."""

    def init(self, layer: LoraLayer, name: str) -> None:
        """Initialise adapter `name`'s extra parameters from its initialised factors."""

    def delta(self, layer: LoraLayer, x: torch.Tensor, name: str, result: torch.Tensor | None) -> torch.Tensor:
        """What adapter `name` adds to the layer's output, in plain autograd ops.

        Args:
            layer: The layer.
            x: Its input, (..., in) (or the index tensor of an Embedding).
            name: The adapter.
            result: The output so far, (..., out) (read only when `reads_output`).

        Returns:
            (..., out), already scaled.
        """
        return layer.lora_delta(x, name)

    def linear_forward(self, layer: LoraLayer, x: torch.Tensor, name: str,
                       result: torch.Tensor | None) -> torch.Tensor:
        """A Linear layer's output with adapter `name` applied, on the training path.

        Args:
            layer: A `layers.linear.Linear`.
            x: Its input, (..., in).
            name: The adapter.
            result: The output so far (..., out), or None to run the base product here as well
                (the base is a frozen, hook-free nn.Linear: see `Linear.forward`).

        Returns:
            A new tensor (..., out).
        """
        spec, a, b = layer.adapters[name], layer.lora_A[name], layer.lora_B[name]
        p = spec.dropout if layer.training else 0.0
        seed = autograd.draw_seed() if p > 0 else None
        if result is None:
            base = layer.base_layer
            return autograd.lora_linear(None, x, a.weight, b.weight, b.bias, spec.scaling, p, seed,
                                        weight=base.weight, bias=base.bias)
        return autograd.lora_linear(result, x, a.weight, b.weight, b.bias, spec.scaling, p, seed)

    def merge(self, layer: LoraLayer, name: str, weight: torch.Tensor, unmerged: Callable[[], torch.Tensor],
              commit: bool) -> torch.Tensor:
        """The weight with adapter `name` folded in (float32, the base weight's layout): W + ΔW.

        Args:
            layer: The layer.
            name: The adapter.
            weight: The weight so far (the base with earlier adapters folded in), float32.
            unmerged: Returns the base weight with no adapter merged (float32, computed once on
                first call), for variants whose merge depends on it.
            commit: The result is written back to the layer: keep what `unmerge` will need.
        """
        return weight + layer.delta_weight(name)

    def unmerge(self, layer: LoraLayer, name: str, weight: torch.Tensor, commit: bool) -> torch.Tensor:
        """The weight with merged adapter `name` taken out (float32): W - ΔW.

        Args:
            layer, name: As for `merge`.
            weight: The weight with `name` (and maybe later adapters' merges removed) folded in.
            commit: The result is written back: forget what `merge` kept.
        """
        return weight - layer.delta_weight(name)

    def forget_merge(self, layer: LoraLayer, name: str) -> None:
        """Drop what a committed `merge` kept for `unmerge`: the merge was rolled back (its weight
        put back by copy), so there is nothing to unmerge. Plain LoRA keeps nothing."""


VARIANTS: dict[str, LoraVariant] = {PLAIN: LoraVariant()}


def register_variant(variant: LoraVariant) -> None:
    """Make `variant` available to `choose_variant` and to every layer, under `variant.name`.

    Raises:
        ValueError: the name is taken by another variant.
    """
    if VARIANTS.get(variant.name, variant) is not variant:
        raise ValueError(f"a LoRA variant named {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant


def choose_variant(config) -> str:
    """The variant `config` (a LoraConfig) asks for: the one registered variant that selects it,
    else plain LoRA.

    Raises:
        ValueError: the config selects more than one variant.
    """
    chosen = [v.name for v in VARIANTS.values() if v.selected_by(config)]
    if len(chosen) > 1:
        raise ValueError(f"the config selects several LoRA variants at once ({', '.join(chosen)}); pick one")
    return chosen[0] if chosen else PLAIN
