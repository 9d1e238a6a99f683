"""Mixed-adapter batches: which rows of a batch use which adapter.

The model builds one `AdapterRouting` per forward from the per-row adapter names, groups the
rows by adapter once, and hands the same object to every LoRA layer. Each layer then runs one
product per group on that group's rows only (so rows never see another adapter's weights) and
adds all groups' results into the output with a single scatter:

    x: (B, ...) -> for each adapter g: delta_g = lora(x[rows_g])  (n_g, ..., out)
    result.index_add_(0, cat(rows_g), cat(delta_g))                  one scatter per layer

A variant whose delta reads the output so far (DoRA's) gets its rows of it (`LoraVariant.reads_output`).
"""

from __future__ import annotations

import torch

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
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """[(adapter, row indices)] for a batch of `batch_size` rows; BASE_ADAPTER rows left out.

        Raises:
            ValueError: the batch size is not a multiple of the number of names.
        """
        key = (batch_size, device)
        if key not in self._groups:
            n = len(self.adapter_names)
            if batch_size % n:
                raise ValueError(f"adapter_names has {n} entries but the batch has {batch_size} rows")
            names = [name for name in self.adapter_names for _ in range(batch_size // n)]
            groups: dict[str, list[int]] = {}
            for row, name in enumerate(names):
                if name != BASE_ADAPTER:
                    groups.setdefault(name, []).append(row)
            self._groups[key] = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
        return self._groups[key]

    def apply(self, layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus, for each row, the LoRA path of that row's adapter in `layer`."""
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
