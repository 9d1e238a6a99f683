"""Quantization for QLoRA: the NF4 format, the frozen 4-bit linear layer, LoRA on it, files.

    from lorakit import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"), quantize="nf4")

Importing this package registers `Linear4bitLora` with `lorakit.dispatch`, so LoRA wraps a
`Linear4bit` like any `nn.Linear`.
"""

from lorakit.quant.linear4bit import DEFAULT_DEQUANT_CHUNK_NUMEL, Linear4bit, quantize_model
from lorakit.quant.lora import (
    QUANTIZE_METHODS,
    Linear4bitLora,
    QuantizedMergeError,
    dequantize_linear,
    has_quantized_layers,
    merge_and_dequantize,
    quantize_for_lora,
)
from lorakit.quant.nf4 import (
    DOUBLE_QUANT_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    dynamic_map,
    nf4_bits_per_param,
    nf4_code,
    quantize_nf4,
)
from lorakit.quant.serialize import load_quantized, save_quantized

__all__ = [
    "DEFAULT_DEQUANT_CHUNK_NUMEL",
    "DOUBLE_QUANT_BLOCKSIZE",
    "NF4_CODE",
    "QUANTIZE_METHODS",
    "Linear4bit",
    "Linear4bitLora",
    "NF4Tensor",
    "QuantizedMergeError",
    "dequantize_linear",
    "dynamic_map",
    "has_quantized_layers",
    "load_quantized",
    "merge_and_dequantize",
    "nf4_bits_per_param",
    "nf4_code",
    "quantize_for_lora",
    "quantize_model",
    "quantize_nf4",
    "save_quantized",
]
