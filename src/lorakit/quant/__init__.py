"""Quantization for QLoRA: the NF4 format and the frozen 4-bit linear layer."""

from lorakit.quant.linear4bit import DEFAULT_DEQUANT_CHUNK_NUMEL, Linear4bit, quantize_model
from lorakit.quant.nf4 import (
    DOUBLE_QUANT_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    dynamic_map,
    nf4_bits_per_param,
    nf4_code,
    quantize_nf4,
)

__all__ = [
    "DEFAULT_DEQUANT_CHUNK_NUMEL",
    "DOUBLE_QUANT_BLOCKSIZE",
    "NF4_CODE",
    "Linear4bit",
    "NF4Tensor",
    "dynamic_map",
    "nf4_bits_per_param",
    "nf4_code",
    "quantize_model",
    "quantize_nf4",
]
