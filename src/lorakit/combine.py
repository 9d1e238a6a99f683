"""Combining adapters into a new one: `add_weighted_adapter` (PEFT's maths).

For adapters i with weights w_i and scalings s_i, on each layer that any of them adapts
(factors A_i: (r_i, in, ...), B_i: (out, r_i, ...); a layer without adapter i skips it), the new
adapter has scaling 1 (r = lora_alpha = its rank) and:

- "cat":    A = [w_1·s_1·A_1; w_2·s_2·A_2; ...]   B = [B_1, B_2, ...]      rank Σ r_i
            B @ A = Σ w_i·s_i·B_i @ A_i = Σ w_i·ΔW_i  exactly.
- "svd":    ΔW = Σ w_i·s_i·B_i @ A_i  (out, in·k), truncated to rank `svd_rank` (default the
            largest input rank): U S V^T = ΔW, B = U_k·S_k, A = V_k^T; `svd_clamp` (a quantile in
            (0, 1]) then clamps B and A to ± that quantile of their entries. The best rank-k
            approximation of the weighted sum (exact when k >= the sum's rank).
- "linear": A = Σ sign(w_i·s_i)·sqrt(|w_i·s_i|)·A_i,  B = Σ sqrt(|w_i·s_i|)·B_i  (equal ranks only).
            Cross terms B_i @ A_j make this a rough approximation of Σ w_i·ΔW_i (PEFT: "avoid it
            if you can afford it"); with a single adapter it is exact.

A lora_B bias becomes Σ w_i·s_i·b_i. With one input adapter, every type is "linear" (as PEFT).
A layer where an input has a smaller rank (rank_pattern) is zero-padded to the new rank.

The new config is the first adapter's with r = lora_alpha = the new rank, no rank/alpha
patterns, no rsLoRA, init_lora_weights=True, lora_bias if any input has it, the union of the
inputs' target_modules (PEFT's rule: list union or "(re1)|(re2)"), and the union of their
modules_to_save; when that union would select other modules than the ones the inputs adapt
(different layers_to_transform or exclude_modules), target_modules lists their full paths.

Differences from PEFT 0.21.2 (where its result would be wrong or silent): an existing
`adapter_name` is an error (PEFT returns silently); rsLoRA inputs give scaling 1 (PEFT keeps
use_rslora, so its combined update is off by sqrt(r)); a modules_to_save module held by one input
keeps that input's trained copy (PEFT starts the new copy from the original module); PiSSA/OLoRA
inputs are refused (their factors apply to a residual base: convert them first, `lorakit.convert`);
ties/dare/magnitude_prune are not implemented.

The command `lorakit combine A,B,... OUT` (in `lorakit.export`) loads the base and the adapters,
combines them with this module and saves the result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import LoraConfig
from .layers import VARIANTS, LoraLayer, ModulesToSave, choose_variant
from .layers.variant import PLAIN
from .layers import init as weight_init
from .targeting import matches, resolve_target_modules, select_targets

if TYPE_CHECKING:
    from .model import LoraModel

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "combine_layer", "combined_rank"]

COMBINATION_TYPES = ("svd", "linear", "cat")
_PEFT_ONLY_TYPES = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                    "magnitude_prune", "magnitude_prune_svd")


# --- the maths, per layer ------------------------------------------------------------------------

def factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, lora_B bias or None) of adapter `name` in `layer`, live tensors.

    A is (r, *rest) and B is (out, r, *ones) for every layer type: Linear (r, in) / (out, r),
    Embedding (r, num_embeddings) / (embedding_dim, r), Conv (r, in, *k) / (out, r, 1, ...).
    """
    a_attr, b_attr = layer.factor_names[:2]  # (Linear also lists DoRA's lora_magnitude_vector)
    a, b = getattr(layer, a_attr)[name], getattr(layer, b_attr)[name]
    if isinstance(b, nn.Module):
        return a.weight, b.weight, b.bias
    return a, b, None


def combine_layer(layer: LoraLayer, adapters: list[str], weights: list[float], combination_type: str, rank: int,
                  svd_clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The combined factors of one layer, for scaling 1 (see the module docstring).

    Args:
        layer: A LoRA wrapper holding at least one of `adapters`.
        adapters: Input adapter names; those absent from this layer are skipped.
        weights: One weight per adapter.
        combination_type: "cat", "svd" or "linear".
        rank: The new adapter's rank.
        svd_clamp: With "svd", the quantile at which to clamp the factors. None: no clamp.

    Returns:
        (A, B, bias) in float32 (float64 for a float64 adapter): A (rank, *rest), B (out, rank,
        *ones), bias (out,) or None when no input has a lora_B bias here.

    Raises:
        ValueError: no input adapter is in this layer, or an unknown combination_type.
    """
    present = [(n, w) for n, w in zip(adapters, weights) if n in layer.adapters]
    if not present:
        raise ValueError("none of the adapters is in this layer")
    parts = []
    for name, weight in present:
        a, b, bias = factors(layer, name)
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        parts.append((a.detach().to(dtype), b.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
                      weight * layer.adapters[name].scaling))
    rest, ones = parts[0][0].shape[1:], parts[0][1].shape[2:]
    if combination_type == "cat":
        a = torch.cat([ws * a for a, _, _, ws in parts], dim=0)  # (Σ r_i, *rest)
        b = torch.cat([b for _, b, _, _ in parts], dim=1)  # (out, Σ r_i, *ones)
    elif combination_type == "linear":
        padded = [(*_pad_rank(a, b, rank), ws) for a, b, _, ws in parts]  # a rank_pattern may lower one here
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for a, _, ws in padded)  # (rank, *rest)
        b = sum(math.sqrt(abs(ws)) * b for _, b, ws in padded)  # (out, rank, *ones)
    elif combination_type == "svd":
        delta = sum(ws * (b.flatten(1) @ a.flatten(1)) for a, b, _, ws in parts)  # (out, in·k)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in·k); m = min
        b = (u[:, :rank] * s[:rank]).reshape(delta.shape[0], -1, *ones)  # U_k S_k: (out, k, *ones)
        a = vh[:rank].reshape(-1, *rest)  # V_k^T: (k, *rest)
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
            b, a = b.clamp(-high, high), a.clamp(-high, high)
    else:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    a, b = _pad_rank(a, b, rank)
    biases = [ws * bias for _, _, bias, ws in parts if bias is not None]
    return a, b, (sum(biases) if biases else None)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to `rank` (a layer whose inputs have smaller ranks)."""
    missing = rank - a.shape[0]
    if missing > 0:
        a = torch.cat([a, a.new_zeros(missing, *a.shape[1:])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], missing, *b.shape[2:])], dim=1)
    return a, b


def combined_rank(configs: list[LoraConfig], combination_type: str, svd_rank: int | None = None) -> int:
    """The new adapter's rank, as PEFT computes it from each input's largest rank.

    Args:
        configs: The input adapters' configs (largest rank: max of r and rank_pattern values).
        combination_type: "cat" (sum), "svd" (`svd_rank`, default the maximum) or "linear" (the common rank).
        svd_rank: With "svd", the rank to truncate to.

    Raises:
        ValueError: "linear" with different ranks; a bad svd_rank or combination_type.
    """
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; "
                             "use 'cat' (exact, ranks add up) or 'svd' (truncated to svd_rank)")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type == "svd":
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
        return svd_rank or max(ranks)
    raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")


# --- the new adapter on a model ------------------------------------------------------------------

def add_weighted_adapter(lora_model: LoraModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, density: float | None = None) -> None:
    """Add adapter `adapter_name` to `lora_model`, combining `adapters` (see the module docstring).

    The new adapter is not made active; `lora_model.set_adapter(adapter_name)` runs it, and it
    saves and loads (in PEFT too) like any adapter.

    Args:
        lora_model: The model holding the input adapters.
        adapters: Names of the adapters to combine (one or more).
        weights: One weight per adapter; negative weights subtract.
        adapter_name: Name of the new adapter.
        combination_type: "svd" (default), "cat" or "linear".
        svd_rank: With "svd", the new rank. Default: the largest input rank.
        svd_clamp: With "svd", clamp the factors at this quantile of their entries. Default None.
        density: PEFT's pruning density for ties/dare/magnitude_prune, which lorakit does not
            implement: must be None.

    Raises:
        KeyError: an unknown input adapter.
        ValueError: the name is invalid or taken; weights and adapters differ in length; an
            unsupported combination_type, density or svd_rank; "linear" with different ranks;
            several inputs train the same modules_to_save module; an input was initialised by
            PiSSA/OLoRA or uses DoRA; the model is on the meta device (no weights to combine).
    """
    from .adapter_format import check_adapter_name

    check_adapter_name(adapter_name)
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} already exists")
    if not adapters:
        raise ValueError("adapters is empty: name at least one adapter to combine")
    for name in adapters:
        lora_model.check_exists(name)
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists an adapter twice: {adapters}")
    if weights is None or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, weights {weights!r}")
    if combination_type in _PEFT_ONLY_TYPES:
        raise ValueError(f"combination_type {combination_type!r} (PEFT's pruning merges) is not implemented; "
                         f"use one of {COMBINATION_TYPES}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    if density is not None:
        raise ValueError("density applies to ties/dare/magnitude_prune combinations, which lorakit does not implement")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    configs = [lora_model.peft_config[n] for n in adapters]
    variants = {n: VARIANTS[choose_variant(c)] for n, c in zip(adapters, configs)}
    others = [n for n, v in variants.items() if v.name != PLAIN]
    if others:
        titles = sorted({variants[n].title for n in others})
        raise ValueError(f"adapters {others} use {', '.join(titles)}: combining adapters of a LoRA variant is not "
                         "implemented (DoRA's magnitude vector belongs to its own W + ΔW, so no combination of the "
                         "factors reproduces it); merge_and_unload() one of them instead")
    for name, config in zip(adapters, configs):
        if weight_init.rewrites_base_weight(config.init_lora_weights):
            raise ValueError(f"adapter {name!r} was initialised with init_lora_weights={config.init_lora_weights!r}: "
                             "its factors apply to the residual base, not the original one; convert it to a plain "
                             "LoRA adapter first (save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                             "or lorakit.convert.convert_to_lora)")
    layers = [(p, layer) for p, layer in lora_model.lora_layers() if any(n in layer.adapters for n in adapters)]
    if any(factors(layer, n)[0].device.type == "meta" for _, layer in layers for n in adapters if n in layer.adapters):
        raise ValueError("the adapters are on the meta device and hold no values; load the base model with real "
                         "weights to combine adapters")
    saved = _modules_to_save_sources(lora_model, adapters)
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: the only exact choice for one adapter
    rank = combined_rank(configs, combination_type, svd_rank)
    combined = {path: combine_layer(layer, adapters, weights, combination_type, rank, svd_clamp)
                for path, layer in layers}  # all maths first: nothing is added if it fails
    config = _combined_config(lora_model, adapters, [p for p, _ in layers], list(saved), rank,
                              lora_bias=any(c.lora_bias for c in configs))
    lora_model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for path, layer in layers:
                a, b, bias = combined[path]
                ta, tb, tbias = factors(layer, adapter_name)
                ta.copy_(a.to(ta.dtype))
                tb.copy_(b.to(tb.dtype))
                if tbias is not None and bias is not None:
                    tbias.copy_(bias.to(tbias.dtype))
                elif tbias is not None:  # lora_bias from another input, none here
                    tbias.zero_()
            for path, source in saved.items():
                module = lora_model.model.get_submodule(path)
                module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[source].state_dict())
    except Exception:
        lora_model.remove_adapter(adapter_name)
        raise


def _modules_to_save_sources(lora_model: LoraModel, adapters: list[str]) -> dict[str, str]:
    """path -> the one input adapter holding a trained copy of that modules_to_save module.

    Raises:
        ValueError: several inputs hold a copy of the same module (they cannot be combined).
    """
    sources = {}
    for path, module in lora_model.model.named_modules():
        if isinstance(module, ModulesToSave):
            holders = [n for n in adapters if n in module.modules_to_save]
            if len(holders) > 1:
                raise ValueError(f"adapters {holders} each train their own copy of {path} (modules_to_save), "
                                 "which cannot be combined")
            if holders:
                sources[path] = holders[0]
    return sources


def _combined_config(lora_model: LoraModel, adapters: list[str], paths: list[str], saved_paths: list[str],
                     rank: int, lora_bias: bool) -> LoraConfig:
    """The new adapter's config: adapts exactly `paths` and trains `saved_paths` in full."""
    configs = [lora_model.peft_config[n] for n in adapters]
    targets = [resolve_target_modules(lora_model.model, c) for c in configs]
    if all(isinstance(t, list) for t in targets):
        union: list[str] | str = sorted(set().union(*targets))
    elif all(isinstance(t, str) for t in targets):
        union = targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    else:
        union = list(paths)  # a mix of names and regexes: list the modules themselves
    saved = sorted({m for c in configs for m in (c.modules_to_save or [])})
    saved += [p for p in saved_paths if not matches(saved, p)]  # e.g. a SEQ_CLS head added by task_type
    config = dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False,
        init_lora_weights=True, lora_bias=lora_bias, target_modules=union,
        modules_to_save=saved or None,
    )
    try:
        selected = select_targets(lora_model.model, config)
    except ValueError:  # TargetError or ConfigError: fall back to the explicit list below
        selected = None
    if selected != list(paths):
        config = dataclasses.replace(config, target_modules=list(paths), layers_to_transform=None,
                                     layers_pattern=None, exclude_modules=None)
    return config
