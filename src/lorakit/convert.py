"""Turn an adapter trained from a PiSSA/OLoRA init into a plain LoRA adapter for the ORIGINAL base.

PiSSA and OLoRA (`init_lora_weights` "pissa", "pissa_niter_K", "olora"; see `lorakit.layers.init`)
replace each adapted base weight W by the residual W_res = W - s·B0·A0, where A0, B0 are the
initial factors and s the scaling. After training to A, B the model computes

    W_res + s·B·A = W + s·(B·A - B0·A0) = W + s'·B'·A'

with PEFT's conversion (`PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion=)`):

    A' = [A; A0]   (2r, in)        B' = [B, -B0]   (out, 2r)
    r' = 2r,  alpha' = 2·alpha  (rsLoRA: alpha' = sqrt(2)·alpha), so s' = s

and rank_pattern / alpha_pattern values scaled the same way. The result is an ordinary LoRA
adapter (init_lora_weights=True) that applies to the unmodified base, loads in PEFT, and can be
combined, merged or switched like any other. lora_B biases become b - b0; every other tensor
(modules_to_save copies, trained base biases) is kept as trained. (PEFT drops those other
tensors and refuses rsLoRA together with rank_pattern/alpha_pattern; lorakit converts both.)

    model = get_peft_model(base, LoraConfig(init_lora_weights="pissa", target_modules=[...]))
    model.save_pretrained("pissa-init")                       # right after init, before training
    ...                                                         # train
    model.save_pretrained("pissa-lora", path_initial_model_for_weight_conversion="pissa-init")
    # or, from two saved folders:
    convert_to_lora("pissa-trained", "pissa-init", "pissa-lora")
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import torch

from . import adapter_format
from .config import LoraConfig
from .layers import init as weight_init

__all__ = ["ConversionError", "converted_adapter", "convert_to_lora"]

# Fields that fix each module's rank and scaling: they must agree between the two adapters.
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


class ConversionError(ValueError):
    """The trained and the initial adapter do not belong together (other fields, keys or shapes)."""


def converted_adapter(config: LoraConfig, tensors: dict[str, torch.Tensor], initial_config: LoraConfig,
                      initial_tensors: dict[str, torch.Tensor], source: str = ""
                      ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The plain-LoRA equivalent of a trained PiSSA/OLoRA adapter (see the module docstring).

    Args:
        config: The trained adapter's config.
        tensors: Its tensors under file keys; a factor A is (r, ...), B is (out, r, ...).
        initial_config: The config saved at initialisation (same rank and scaling fields).
        initial_tensors: The factors saved at initialisation, same keys and shapes.
        source: Where the initial adapter came from, for messages.

    Returns:
        (config, tensors): r and every rank doubled, alphas scaled to keep each scaling,
        init_lora_weights=True; A' = [A; A0] along dim 0, B' = [B, -B0] along dim 1.

    Raises:
        ConversionError: a rank/scaling field differs, or a factor is missing from the initial
            adapter or has another shape.
    """
    where = f"initial adapter {source!r}" if source else "initial adapter"
    if not weight_init.rewrites_base_weight(config.init_lora_weights):
        warnings.warn(f"converting an adapter with init_lora_weights={config.init_lora_weights!r}: the conversion "
                      "is meant for PiSSA/OLoRA adapters; the result equals the trained adapter only if its initial "
                      "B was zero", stacklevel=2)
    differ = [f for f in _SCALING_FIELDS if getattr(config, f) != getattr(initial_config, f)]
    if differ:
        pairs = ", ".join(f"{f}={getattr(initial_config, f)!r} vs {getattr(config, f)!r}" for f in differ)
        raise ConversionError(f"{where} does not match the trained adapter: {pairs}")
    parsed = {k: adapter_format.parse_factor_key(k) for k in tensors}
    factor_keys = sorted(k for k, f in parsed.items() if f is not None and f.leaf != "bias")
    missing = [k for k in factor_keys if k not in initial_tensors]
    if missing:
        raise ConversionError(f"{where} lacks {len(missing)} factors of the trained adapter, e.g. {missing[:3]}; "
                              "was it saved from the same model and config?")
    shapes = [f"{k}: {tuple(initial_tensors[k].shape)} vs {tuple(tensors[k].shape)}" for k in factor_keys
              if initial_tensors[k].shape != tensors[k].shape]
    if shapes:
        raise ConversionError(f"{where}: factor shapes differ from the trained adapter's: {shapes[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        factor = parsed[key]
        initial = initial_tensors.get(key)
        if factor is not None and factor.leaf != "bias" and factor.factor == "A":
            out[key] = torch.cat([tensor, initial.to(tensor.dtype)], dim=0)  # [A; A0]: (2r, ...)
        elif factor is not None and factor.leaf != "bias":
            out[key] = torch.cat([tensor, -initial.to(tensor.dtype)], dim=1)  # [B, -B0]: (out, 2r, ...)
        elif factor is not None and factor.factor == "B" and initial is not None:  # lora_B's bias
            out[key] = tensor - initial.to(tensor.dtype)  # (out,)
        else:
            out[key] = tensor
        out[key] = out[key].contiguous()
    factor = math.sqrt(2) if config.use_rslora else 2  # alpha' / alpha, so that alpha' / f(2r) = alpha / f(r)
    new_config = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return new_config, out


def convert_to_lora(adapter_dir: str | os.PathLike, initial_adapter_dir: str | os.PathLike,
                    out_dir: str | os.PathLike) -> Path:
    """Convert a saved, trained PiSSA/OLoRA adapter into a plain LoRA adapter for the original base.

    Args:
        adapter_dir: The trained adapter's folder.
        initial_adapter_dir: The folder saved right after initialisation, before training.
        out_dir: Where to write the converted adapter (neither input folder).

    Returns:
        `out_dir` as a Path.

    Raises:
        AdapterLoadError: an input folder is missing or malformed.
        ConversionError: the two adapters do not match (see `converted_adapter`).
        ValueError: `out_dir` is one of the input folders.
    """
    out = Path(out_dir)
    if out.resolve() in (Path(adapter_dir).resolve(), Path(initial_adapter_dir).resolve()):
        raise ValueError(f"out_dir {str(out_dir)!r} would overwrite an input adapter; choose another folder")
    config, tensors = adapter_format.read_adapter(adapter_dir)
    initial_config, initial_tensors = adapter_format.read_adapter(initial_adapter_dir)
    new_config, new_tensors = converted_adapter(config, tensors, initial_config, initial_tensors,
                                                source=str(initial_adapter_dir))
    adapter_format.write_adapter(out, new_config, new_tensors, what=f"converted adapter {str(adapter_dir)!r}")
    return out
