"""Mixed-adapter batches: which rows of a batch use which adapter.

The model builds one `AdapterRouting` per forward from the per-row adapter names and hands the
same object to every LoRA layer. A layer takes one of two paths, chosen once per routing:

Stacked (the default, Punica / S-LoRA style): the layer's plain-LoRA adapters live stacked,
zero-padded to the largest rank, slot 0 all zeros (`layers.stacked.LoraStack`); each row's
slot goes into one index tensor `idx` (B,) (base rows and adapters that do not target the
layer: slot 0), and the whole batch takes one gathered product per factor, with no loop over
adapters:

    x: (B, L, in) -> h = x @ A[idx]^T (B, L, r_max) -> result + h @ (s · B)^T[idx] (B, L, out)

(`result`, the base output, is computed inside that last product where the base is a plain
nn.Linear called with x alone, in the stack's dtype and device, its weight frozen or grad off:
`AdapterRouting._fusable`, and `layers.stacked` for why.)

Grouped (everything the stack cannot express): rows grouped by adapter once per batch shape,
one product per group on its rows only, one scatter per layer:

    x: (B, ...) -> for each adapter g: delta_g = lora(x[rows_g])  (n_g, ..., out)
    result.index_add_(0, cat(rows_g), cat(delta_g))                  one scatter per layer

A layer is grouped when a routed adapter in it is not plain LoRA (DoRA's delta reads its rows
of the output so far, `LoraVariant.reads_output`), has dropout in train mode, when gradients
must reach its factors (grad mode on and a factor requires grad), when the layer type has no
stack (Conv; Embedding with max_norm), under autocast (whose per-op casts the grouped path
follows), and on the reference path (`autograd.set_lora_path("plain")`, against which the
stacked path is tested).
"""

from __future__ import annotations

import torch

from . import autograd, stacked
from .linear import Linear, plain_linear
from .variant import PLAIN

BASE_ADAPTER = "__base__"  # the row runs the base model alone


class AdapterRouting:
    """Row groups of a batch, by adapter name.

    Args:
        adapter_names: One name per row; BASE_ADAPTER for rows without an adapter.

    Generation may repeat each row k times (beams, several sequences per prompt): a batch of
    k * len(adapter_names) rows is routed with each name repeated k times, as transformers
    expands its inputs.
    """

    def __init__(self, adapter_names: list[str]) -> None:
        self.adapter_names = list(adapter_names)
        self._names = tuple(self.adapter_names)  # the batch composition, the key of `LoraStack.row_slots`
        self._distinct = list(dict.fromkeys(self.adapter_names))
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}
        self._plans: dict[int, tuple[object, list[str], bool]] = {}  # id(layer) -> (layer, routed names, stackable)

    def rows_per_name(self, batch_size: int) -> int:
        """How many consecutive rows each name covers (1, or k for k repeats per row).

        Raises:
            ValueError: the batch size is not a multiple of the number of names.
        """
        n = len(self.adapter_names)
        if batch_size % n:
            raise ValueError(f"adapter_names has {n} entries but the batch has {batch_size} rows")
        return batch_size // n

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter, row indices)] for a batch of `batch_size` rows; BASE_ADAPTER rows left out.

        Raises:
            ValueError: the batch size is not a multiple of the number of names.
        """
        key = (batch_size, device)
        if key not in self._groups:
            repeats = self.rows_per_name(batch_size)
            names = [name for name in self.adapter_names for _ in range(repeats)]
            groups: dict[str, list[int]] = {}
            for row, name in enumerate(names):
                if name != BASE_ADAPTER:
                    groups.setdefault(name, []).append(row)
            self._groups[key] = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
        return self._groups[key]

    def _plan(self, layer) -> tuple[list[str], bool]:
        """(the routed adapters `layer` holds, whether the stacked path can serve them), once per routing."""
        plan = self._plans.get(id(layer))
        if plan is None or plan[0] is not layer:
            routed = [n for n in self._distinct if n in layer.adapters]
            stackable = stacked.supports(layer) and all(
                layer.adapters[n].variant == PLAIN and not (layer.training and layer.adapters[n].dropout > 0)
                for n in routed)
            plan = self._plans[id(layer)] = (layer, routed, stackable)
        return plan[1], plan[2]

    @staticmethod
    def _fusable(layer, stack: stacked.LoraStack, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the stack may run `layer`'s base product itself (`LoraStack.apply(base=)`):
        a Linear whose base is a `plain_linear` (asked on every forward: hooks come and go),
        called with x alone, x and the weight in the stack's dtype and on its device, and no
        gradient for the weight."""
        base = layer.base_layer
        if args or kwargs or not isinstance(layer, Linear) or not plain_linear(base):
            return False
        weight = base.weight
        return (x.dtype == weight.dtype == stack.dtype and x.device == weight.device == stack.a.device
                and not (weight.requires_grad and torch.is_grad_enabled()))

    def _stack(self, layer, routed: list[str], x: torch.Tensor) -> stacked.LoraStack | None:
        """`layer`'s stack for this forward, or None where the grouped path must run."""
        if autograd.get_lora_path() == "plain" or torch.is_autocast_enabled(x.device.type):
            return None
        if torch.is_grad_enabled() and any(
                t.requires_grad for n in routed for t in stacked.factor_tensors(layer, n)):
            return None
        stack = stacked.stack_for(layer)
        return stack if all(n in stack.slots for n in routed) else None

    def forward(self, layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`layer`'s base output plus, for each row, the LoRA path of that row's adapter in `layer`.

        Args:
            layer: The LoRA layer; its base layer is called with (x, *args, **kwargs).
            x: The layer's input, (B, ...) with B a multiple of the number of names.

        Raises:
            ValueError: the batch size is not a multiple of the number of names.
        """
        routed, stackable = self._plan(layer)
        stack = self._stack(layer, routed, x) if routed and stackable else None
        if stack is not None:
            idx, shared = stack.row_slots(self._names, self.rows_per_name(x.shape[0]), x.device)
            base = layer.base_layer
            if self._fusable(layer, stack, x, args, kwargs):
                # The base product is added into the LoRA output (one output-sized tensor, not two).
                return stack.apply(x, idx, shared, base=(base.weight, base.bias))
            result = base(x, *args, **kwargs)  # (B, ..., out)
            # In place only where no graph or hook can hold the base output.
            in_place = not torch.is_grad_enabled() and not base._forward_hooks and result.is_contiguous()
            return stack.apply(x, idx, shared, result=result, in_place=in_place)
        result = layer.base_layer(x, *args, **kwargs)
        if not routed:
            self.rows_per_name(x.shape[0])  # the batch is still checked
            return result
        rows_all, deltas = [], []
        for name, rows in self.groups(x.shape[0], x.device):
            if name in layer.adapters:  # an adapter may not target this layer
                rows_all.append(rows)
                variant = layer.variant(name)
                output = result.index_select(0, rows) if variant.reads_output else None
                deltas.append(variant.delta(layer, x.index_select(0, rows), name, output))
        if not deltas:
            return result
        delta = torch.cat(deltas) if len(deltas) > 1 else deltas[0]
        index = torch.cat(rows_all) if len(rows_all) > 1 else rows_all[0]
        return result.index_add(0, index, delta.to(result.dtype))

    def run_module(self, modules: dict, original, *args, **kwargs) -> torch.Tensor:
        """For modules_to_save: each group's rows through that adapter's copy, the rest through the original."""
        x = args[0]
        out = original(*args, **kwargs)
        for name, rows in self.groups(x.shape[0], x.device):
            if name in modules:
                sub = modules[name](x.index_select(0, rows), *args[1:], **kwargs)
                out = out.index_copy(0, rows, sub.to(out.dtype))
        return out
