"""Quantization for QLoRA: the NF4 format, the frozen 4-bit linear layer, LoRA on it, files.

    from lorakit import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"), quantize="nf4")

This package registers the "nf4" format in `registry.QUANTIZERS` (the 4-bit layer, its LoRA
wrapper, its merge, its sizes), which the dispatcher, targeting, merging, counting and the
memory estimate consult.
"""

from lorakit.quant import registry
from lorakit.quant.linear4bit import DEFAULT_DEQUANT_CHUNK_NUMEL, Linear4bit, make_parameters_shardable, quantize_model
from lorakit.quant.lora import (
    Linear4bitLora,
    QuantizedMergeError,
    dequantize_linear,
    dequantized_layers,
    has_quantized_layers,
    quantize_for_lora,
)
from lorakit.quant.nf4 import (
    DOUBLE_QUANT_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
    dynamic_map,
    nf4_bits_per_param,
    nf4_code,
    nf4_nbytes,
    quantize_nf4,
)
from lorakit.quant.registry import QUANTIZERS, Quantizer
from lorakit.quant.serialize import load_quantized, save_quantized

registry.register(Quantizer(
    name="nf4",
    layer_type=Linear4bit,
    quantize_model=quantize_model,
    wrap=Linear4bitLora,
    dequantized_layers=dequantized_layers,
    weight_bytes=lambda numel, double_quant: nf4_nbytes(numel, double_quant=double_quant),
    logical_numel=lambda layer: layer.quantized_numel,
    shardable=make_parameters_shardable,
))

__all__ = [
    "DEFAULT_DEQUANT_CHUNK_NUMEL",
    "DOUBLE_QUANT_BLOCKSIZE",
    "NF4_CODE",
    "Linear4bit",
    "Linear4bitLora",
    "NF4Tensor",
    "QUANTIZERS",
    "Quantizer",
    "QuantizedMergeError",
    "dequantize_linear",
    "dynamic_map",
    "has_quantized_layers",
    "load_quantized",
    "dequantized_layers",
    "nf4_bits_per_param",
    "nf4_code",
    "nf4_nbytes",
    "quantize_for_lora",
    "quantize_model",
    "quantize_nf4",
    "save_quantized",
]
