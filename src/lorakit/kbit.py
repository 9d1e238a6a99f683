"""`prepare_model_for_kbit_training`: PEFT's preparation of a (4-bit) base before LoRA training.

    model = prepare_model_for_kbit_training(base)      # then get_peft_model(model, config)

What PEFT 0.21's function does, with lorakit's own 4-bit layer (`lorakit.quant.Linear4bit`)
counted as a k-bit model: every parameter frozen; every float16/bfloat16 parameter outside the
packed 4-bit storage (norms, embeddings, the head) cast to float32 (not on GPTQ, AQLM, EETQ,
HQQ or torchao models, as in PEFT); and, on a k-bit model,
input gradients on and gradient checkpointing on. A plain float model gets the first two only,
as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .quant.registry import model_quantizer


# transformers' quantization methods whose parameters PEFT leaves in their dtype (no upcast)
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def is_kbit_model(model: nn.Module) -> bool:
    """Whether `model` is quantized: loaded in 8/4 bits by transformers (bitsandbytes, GPTQ, ...) or
    holding layers of a lorakit format (`lorakit.quant.registry`)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if getattr(model, "quantization_method", None) in _KEEP_DTYPE_METHODS or getattr(model, "hqq_quantized", False):
        return True
    return model_quantizer(model) is not None


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Freeze `model`, upcast its 16-bit float parameters, and on a k-bit model turn on gradient
    checkpointing with input gradients, as PEFT does. Returns `model` (changed in place).

    Args:
        model: A transformers model (or any module).
        use_gradient_checkpointing: On a k-bit model, recompute activations in backward. Default True.
        gradient_checkpointing_kwargs: Passed to the checkpointing function (e.g.
            {"use_reentrant": False}). With reentrant checkpointing (the default when
            `use_reentrant` is not given) input gradients are switched on, which it needs.
        auto_clear_cache: Empty the CUDA cache after upcasting. Default True.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    keep_dtype = (getattr(model, "quantization_method", None) in _KEEP_DTYPE_METHODS
                  or getattr(model, "hqq_quantized", False))
    if not keep_dtype:
        for param in model.parameters():  # 4-bit storage is uint8: never touched here
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if is_kbit_model(model) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; gradient_checkpointing_enable before
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
