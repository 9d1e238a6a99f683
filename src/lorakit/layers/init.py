"""Initialisations that take the factors from the base weight: PiSSA and OLoRA (PEFT's maths).

Both split the frozen base weight W (out, in) of a linear layer into a rank-r part carried by
the trainable factors and a residual that replaces W as the frozen base weight:

    W_res = W - scaling · B @ A        so that   W_res + scaling · B @ A = W

and the freshly initialised model computes what the base model computes (up to rounding).

- PiSSA (`init_lora_weights="pissa"`): W = U S V^T (exact SVD). With U_r, S_r, V_r the top-r
  singular triplets and S' = S_r / scaling:

      A = diag(sqrt(S')) V_r^T   (r, in)        B = U_r diag(sqrt(S'))   (out, r)

  so scaling · B @ A = U_r S_r V_r^T, the best rank-r approximation of W.
  `"pissa_niter_K"` takes U_r, S_r, V_r from `torch.svd_lowrank(W, q=r, niter=K)` instead: a
  randomised SVD (K subspace iterations, the global torch RNG) that is much faster on large W.
- OLoRA (`init_lora_weights="olora"`): W = Q R (reduced QR), A = R[:r] (r, in), B = Q[:, :r]
  (out, r), with no division by the scaling: scaling · B @ A = scaling · Q_r R_r.

The decomposition runs in float32 (float64 for a float64 base); the factors are stored in the
adapter's dtype and the residual is cast back to W's dtype (so a bf16 base reproduces W only
up to one bf16 rounding). A GPT-2 `Conv1D` (weight stored (in, out)) is transposed to (out, in)
first and the residual transposed back.

Because W itself changes, an adapter trained from these inits applies to the residual, not to
the original base: `lorakit.convert.convert_to_lora` turns it into a plain LoRA adapter (rank 2r)
for the original base. Only LoRA on linear layers with a float weight supports them.
"""

from __future__ import annotations

import re

import torch

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import AdapterSpec, LoraLayer

WEIGHT_INITS = ("pissa", "olora")  # plus "pissa_niter_<K>", K >= 1
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def pissa_niter(init: object) -> int | None:
    """K of an `init_lora_weights="pissa_niter_K"`, else None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def rewrites_base_weight(init: object) -> bool:
    """Whether `init_lora_weights` takes the factors from W and replaces W by the residual."""
    return isinstance(init, str) and (init in WEIGHT_INITS or pissa_niter(init) is not None)


def check_layer(layer: LoraLayer, spec: AdapterSpec, init: str) -> None:
    """Raise unless `layer` can take a weight-derived init of rank `spec.r` (nothing is changed).

    Args:
        layer: A LoRA wrapper.
        spec: The adapter's record (its rank is checked against the weight's shape).
        init: "pissa", "pissa_niter_K" or "olora".

    Raises:
        ValueError: the layer is not a LoRA Linear (Embedding, Conv, ...), its base weight is not
            a floating-point matrix (e.g. a 4-bit base), or r > min(in_features, out_features).
    """
    kind = type(layer.base_layer).__name__
    if not layer.supports_weight_init:
        raise ValueError(f"init_lora_weights={init!r} is supported on linear layers only, not on {kind} "
                         f"({type(layer).__name__} wrapper); leave such layers out of target_modules or use "
                         f"True or 'gaussian'")
    weight = getattr(layer.base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"init_lora_weights={init!r} rewrites the base weight, which must be a float matrix; "
                         f"the {kind} base layer has none (a quantized base?): use True or 'gaussian'")
    if spec.r > min(layer.in_features, layer.out_features):
        raise ValueError(f"init_lora_weights={init!r}: r={spec.r} exceeds min(in, out) = "
                         f"{min(layer.in_features, layer.out_features)} of a {layer.out_features}x{layer.in_features} "
                         f"{kind}; lower r (or its rank_pattern)")


def init_from_weight(layer: LoraLayer, name: str, init: str) -> None:
    """Initialise adapter `name` of a LoRA Linear by PiSSA or OLoRA and write the residual into W.

    Args:
        layer: A `lorakit.layers.Linear` whose adapter `name` already has its factors.
        name: The adapter.
        init: "pissa", "pissa_niter_K" (K >= 1) or "olora".

    Raises:
        ValueError: see `check_layer`, or an unknown `init`.
    """
    spec = layer.adapters[name]
    check_layer(layer, spec, init)
    weight = _weight_out_in(layer)  # (out, in), float32/64
    if init == "olora":
        a, b = olora_factors(weight, spec.r)
    elif init == "pissa" or pissa_niter(init) is not None:
        a, b = pissa_factors(weight, spec.r, spec.scaling, niter=pissa_niter(init))
    else:
        raise ValueError(f"unknown weight-derived init {init!r}; expected one of {WEIGHT_INITS} or 'pissa_niter_K'")
    residual = weight - spec.scaling * (b @ a)  # (out, in)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    base_weight = layer.base_layer.weight
    with torch.no_grad():
        lora_a.weight.copy_(a.to(lora_a.weight.dtype))
        lora_b.weight.copy_(b.to(lora_b.weight.dtype))
        if lora_b.bias is not None:  # (PEFT refuses lora_bias with these inits; the config does too)
            lora_b.bias.zero_()
        base_weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(base_weight.dtype))


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's factors of `weight` (PEFT's `pissa_init`).

    Args:
        weight: W, shape (out, in), float32 or float64.
        r: Rank, at most min(out, in).
        scaling: The adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
        niter: None for the exact SVD; K for `torch.svd_lowrank(W, q=r, niter=K)`.

    Returns:
        (A, B): A of shape (r, in), B of shape (out, r), with scaling · B @ A the rank-r SVD
        approximation of W.
    """
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, q=r, niter=niter)  # (out, r), (r,), (in, r)
        vh_r = v_r.T
    root = torch.sqrt(s_r / scaling)  # (r,)
    a = root[:, None] * vh_r  # diag(sqrt(S')) @ V_r^T: (r, in)
    b = u_r * root[None, :]  # U_r @ diag(sqrt(S')): (out, r)
    return a.contiguous(), b.contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's factors of `weight` (PEFT's `olora_init`).

    Args:
        weight: W, shape (out, in), float32 or float64.
        r: Rank, at most min(out, in).

    Returns:
        (A, B) = (R[:r], Q[:, :r]) of the reduced QR W = Q R: A (r, in), B (out, r) with
        orthonormal columns.
    """
    q, rr = torch.linalg.qr(weight)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _weight_out_in(layer: LoraLayer) -> torch.Tensor:
    """The base weight as an (out, in) matrix in float32 (float64 for a float64 base), detached."""
    weight = layer.base_layer.weight.detach()
    weight = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return weight.T if layer.fan_in_fan_out else weight
