"""LoRA layer wrappers: one per base layer type, all sharing `LoraLayer`, and the variants
(plain LoRA, DoRA) their adapters run through."""

from .base import AdapterSpec, LoraLayer
from .conv import Conv
from .dora import DoraVariant
from .embedding import Embedding
from .linear import Linear
from .modules_to_save import ModulesToSave
from .routing import BASE_ADAPTER, AdapterRouting
from .variant import VARIANTS, LoraVariant, choose_variant, register_variant

register_variant(DoraVariant())

__all__ = ["AdapterSpec", "LoraLayer", "Linear", "Embedding", "Conv", "ModulesToSave", "AdapterRouting", "BASE_ADAPTER",
           "LoraVariant", "DoraVariant", "VARIANTS", "choose_variant", "register_variant"]
