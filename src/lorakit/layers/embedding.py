"""LoRA on an `nn.Embedding`.

    y = embed(ids) + scaling · (A^T[ids]) @ B^T      A: (r, num_embeddings), B: (embedding_dim, r)

The factors are plain parameters named `lora_embedding_A` / `lora_embedding_B` (PEFT's names,
so the file keys match). Initialisation is PEFT's: A zeros, B normal, so ΔW starts at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterSpec, LoraLayer


class Embedding(LoraLayer):
    """LoRA wrapper for nn.Embedding (dropout does not apply to token ids and is ignored)."""

    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_factors(self, name: str, spec: AdapterSpec, device: torch.device, dtype: torch.dtype) -> None:
        if spec.lora_bias:
            raise ValueError("lora_bias is not supported on Embedding layers")
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(spec.r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.embedding_dim, spec.r, device=device, dtype=dtype))

    def _reset_factors(self, name: str, init: bool | str) -> None:
        if init is False:
            return
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        # (B, T) ids -> (B, T, r): rows of A^T, with the base layer's lookup options
        after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return (after_a @ b.T) * self.adapters[name].scaling  # (B, T, embedding_dim)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].detach().float()  # (r, num_embeddings)
        b = self.lora_embedding_B[name].detach().float()  # (embedding_dim, r)
        return (b @ a).T * self.adapters[name].scaling  # (num_embeddings, embedding_dim)
