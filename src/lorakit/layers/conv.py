"""LoRA on `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`.

    y = conv(x) + scaling · B(A(dropout(x)))

A is a convolution with the base's kernel, stride, padding and dilation into r channels,
B a 1x1 convolution from r channels to the base's output channels (PEFT's layout), so
ΔW = B ∘ A is again a convolution kernel of the base's shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import dropout
from .base import AdapterSpec, LoraLayer

_CONV = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


class Conv(LoraLayer):
    """LoRA wrapper for 1-, 2- and 3-d convolutions without groups.

    Raises:
        ValueError: the base convolution uses groups > 1 or a padding mode other than zeros.
    """

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on a convolution with padding_mode={base_layer.padding_mode!r} is not supported")
        self.ndim = base_layer.weight.dim() - 2
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        base = self.base_layer
        conv_cls, _ = _CONV[self.ndim]
        self.lora_A[name] = conv_cls(base.in_channels, spec.r, base.kernel_size, base.stride, base.padding,
                                     base.dilation, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = conv_cls(spec.r, base.out_channels, 1, 1, bias=spec.lora_bias, device=device, dtype=dtype)

    def _reset_factors(self, name: str, init: bool | str) -> None:
        a, b = self.lora_A[name], self.lora_B[name]
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(a.weight, std=1 / self.adapters[name].r)
        else:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        spec = self.adapters[name]
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(dropout(x.to(a.weight.dtype), spec.dropout, self.training))) * spec.scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.detach().float()  # (r, in, *k)
        b = self.lora_B[name].weight.detach().float()  # (out, r, 1...)
        if all(k == 1 for k in a.shape[2:]):
            delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], a.shape[1], *a.shape[2:])
        else:
            _, conv = _CONV[self.ndim]
            # compose the two kernels: (in, r, *k) conv (out, r, 1...) -> (in, out, *k) -> (out, in, *k)
            delta = conv(a.transpose(0, 1), b).transpose(0, 1)
        return delta * self.adapters[name].scaling
