"""A module trained in full alongside an adapter (e.g. a classifier head): one copy per adapter.

The original stays frozen as `original_module`; each adapter gets a trainable deep copy under
`modules_to_save.<adapter>` (PEFT's layout, so the file key is the plain module path).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSave(nn.Module):
    """Routes forward to the active adapter's copy, or to the original when none is active."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing = None  # set by LoraModel for a mixed-adapter batch

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def rename_adapter(self, old: str, new: str) -> None:
        """Give adapter `old`'s copy the name `new` (a free name)."""
        if new in self.modules_to_save:
            raise ValueError(f"adapter {new!r} already has a copy of this module")
        if old in self.modules_to_save:
            self.modules_to_save[new] = self.modules_to_save.pop(old)
        if self.active_adapter == old:
            self.active_adapter = new

    def set_active(self, names: list[str]) -> None:
        active = [n for n in names if n in self.modules_to_save]
        self.active_adapter = active[0] if active else None

    @property
    def active_adapters(self) -> list[str]:
        """The adapter whose copy runs, as a list (as `LoraLayer.active_adapters`)."""
        return [self.active_adapter] if self.active_adapter is not None else []

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    @property
    def weight(self) -> torch.Tensor:  # lets transformers' tied-weight and head lookups keep working
        return self._current().weight

    def _current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        if self.routing is not None and not self.disabled:
            return self.routing.run_module(self.modules_to_save, self.original_module, *args, **kwargs)
        return self._current()(*args, **kwargs)
