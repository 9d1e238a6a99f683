"""LoRA layer wrappers: one per base layer type, all sharing `LoraLayer`."""

from .base import AdapterSpec, LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear
from .modules_to_save import ModulesToSave
from .routing import BASE_ADAPTER, AdapterRouting

__all__ = ["AdapterSpec", "LoraLayer", "Linear", "Embedding", "Conv", "ModulesToSave", "AdapterRouting", "BASE_ADAPTER"]
