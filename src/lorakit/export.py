"""Folder-to-folder commands: `lorakit merge` (an adapter folded into its base, written as a full
Hugging Face model folder) and `lorakit combine` (several adapters of one base combined into one).

Usage: lorakit merge ADAPTER OUT [--base MODEL] [--dtype bf16|fp16|fp32] [--no-safe-merge]
                                 [--quantize nf4 [--double-quant]] [--overwrite]
       lorakit combine A,B OUT [--weights 1,0.5] [--combination-type svd|cat|linear] [--model MODEL]

The folder (config.json, model.safetensors, generation config, tokenizer) loads with
`AutoModelForCausalLM.from_pretrained(OUT)` and needs neither lorakit nor PEFT. It is written
into a temporary folder beside OUT and renamed into place, so OUT is either complete or absent.

The merge runs in float32 on the CPU: W' = W + scaling · B @ A, then the model is cast to
`dtype`. With `--quantize nf4` the base is first quantized as in training
(`get_peft_model(..., quantize="nf4")`), so the merged weights are dequant(NF4(W)) + ΔW: exactly
the model the adapter was trained with on a 4-bit base, rather than the float base plus ΔW.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Literal

import torch

from .combine import combined_rank
from .config import read_config
from .files import staged_directory
from .layers.init import rewrites_base_weight
from .peft_model import PeftModel

__all__ = ["DTYPES", "combine", "merge"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# adapter task_type -> transformers auto class that loads the matching model (causal LMs: lorakit.hub)
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def load_base(base: str | None, task_type: str | None, dtype: torch.dtype):
    """(model, tokenizer or None) of a base model folder, or of the embedded default model (None).

    A causal LM (task CAUSAL_LM or none given) loads through `lorakit.hub`, which knows the
    embedded model and never downloads; other tasks load with their transformers auto class
    from a local folder.

    Raises:
        ValueError: the model cannot be found or loaded.
    """
    if task_type in (None, "CAUSAL_LM"):
        from lorakit.hub import ModelLoadError, load_model_and_tokenizer

        try:
            return load_model_and_tokenizer(base, dtype=dtype)
        except ModelLoadError as err:
            raise ValueError(str(err)) from err
    if base is None:
        raise ValueError(f"the adapter ({task_type}) does not name its base model; pass --base")
    import transformers

    cls = getattr(transformers, _AUTO_CLASSES[task_type])
    try:
        model = cls.from_pretrained(base, dtype=dtype, local_files_only=True)
    except OSError as err:
        raise ValueError(f"cannot load the base model {base!r}: {err}") from err
    return model, _load_tokenizer(base)


def _load_tokenizer(source: str):
    """The tokenizer saved in folder `source`, or None when there is none."""
    from transformers import AutoTokenizer

    folder = Path(source)
    if not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def merge(
    adapter: str,
    out: str,
    base: str | None = None,
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
    safe_merge: bool = True,
    quantize: Literal["nf4"] | None = None,
    double_quant: bool = False,
    overwrite: bool = False,
) -> int:
    """Merge an adapter into its base model and write a full Hugging Face model folder.

    Args:
        adapter: Adapter folder (adapter_config.json + adapter_model.safetensors).
        out: Folder to write the merged model and tokenizer into (must not exist or be empty).
        base: Base model folder, or "default" for the embedded model. Default: the
            adapter's base_model_name_or_path, or the embedded model when it names none.
        dtype: dtype of the written weights (the merge itself runs in float32).
        safe_merge: Refuse to write weights holding NaN or inf.
        quantize: Quantize the base as in training ("nf4") before merging, for an adapter
            trained on a 4-bit base: the merged weights are then the dequantized NF4 ones plus ΔW.
        double_quant: With quantize, the base was trained with double-quantized scales.
        overwrite: Replace an existing non-empty out folder.

    Returns:
        0 on success.

    Raises:
        ValueError: a bad adapter folder (AdapterLoadError), a non-finite merged weight with
            safe_merge, out not writable as asked, or no base model to merge into.
    """
    config = read_config(adapter)
    base = base or config.base_model_name_or_path
    out_path, adapter_path = Path(out).resolve(), Path(adapter).resolve()
    inputs = [adapter_path] + ([Path(base).resolve()] if base and Path(base).exists() else [])
    if any(out_path == p or out_path in p.parents for p in inputs):
        raise ValueError(f"out {out} would overwrite its own input ({adapter if out_path == adapter_path else base})")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    model, tokenizer = load_base(base, config.task_type, torch.float32)
    tokenizer = _load_tokenizer(adapter) or tokenizer  # a tokenizer saved with the adapter wins
    if quantize is not None:
        from lorakit.quant.lora import quantize_for_lora

        quantize_for_lora(model, config, quantize, double_quant=double_quant)
    peft_model = PeftModel.from_pretrained(model, adapter)
    merged = peft_model.merge_and_unload(safe_merge=safe_merge, dtype=DTYPES[dtype])
    with staged_directory(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            warnings.warn(f"no tokenizer found with the adapter or at {base!r}; {out} has none", stacklevel=2)
    print(f"merged {adapter} into {base or 'the embedded model'} -> {out} ({dtype})")
    return 0


# --- lorakit combine -----------------------------------------------------------------------------

def combine(
    adapters: list[str],
    out: str,
    weights: list[float] | None = None,
    combination_type: Literal["svd", "linear", "cat"] = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> int:
    """Combine several adapters of one base model into a new adapter folder (PEFT's add_weighted_adapter).

    Args:
        adapters: Comma-separated adapter folders to combine.
        out: Folder to write the combined adapter into (must not exist or be empty).
        weights: Comma-separated weight per adapter (negative subtracts). Default: 1 for each,
            i.e. the sum of their updates.
        combination_type: "svd" (the weighted sum of the updates, truncated to svd_rank), "cat"
            (exact, the ranks add up) or "linear" (sums the factors; equal ranks only; rough).
        svd_rank: With svd, the rank of the combined adapter. Default: the largest input rank.
        svd_clamp: With svd, clamp the factors at this quantile of their entries (e.g. 0.99).
        model: Base model folder, or "default" for the embedded model. Default: the adapters'
            base_model_name_or_path (they must agree), or the embedded model when none is named.
        overwrite: Replace an existing non-empty out folder.

    Returns:
        0 on success.

    Raises:
        ValueError: a bad adapter folder, adapters naming different bases without --model, an
            invalid combination (see `add_weighted_adapter`), or out not writable as asked.
    """
    if not adapters:
        raise ValueError("no adapters given: pass comma-separated adapter folders")
    weights = [1.0] * len(adapters) if weights is None else weights
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    out_path = Path(out).resolve()
    if any(out_path == Path(a).resolve() for a in adapters):
        raise ValueError(f"out {out} is one of the input adapters")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    configs = [read_config(a) for a in adapters]
    for folder, config in zip(adapters, configs):  # before loading: loading would rerun PiSSA on the base
        if rewrites_base_weight(config.init_lora_weights):
            raise ValueError(f"{folder} is a {config.init_lora_weights!r}-initialised adapter, which applies to a "
                             "residual base; convert it first (lorakit.convert.convert_to_lora)")
    combined_rank(configs, combination_type, svd_rank)  # refuse e.g. 'linear' on other ranks before loading
    named = {c.base_model_name_or_path for c in configs if c.base_model_name_or_path}
    if model is None and len(named) > 1:
        raise ValueError(f"the adapters name different base models {sorted(named)}; pick one with --model")
    base_name = model or (named.pop() if named else None)
    tasks = {c.task_type for c in configs}
    # The factors are float32 whatever the base dtype: a bfloat16 base halves memory and changes nothing.
    base, _ = load_base(base_name, configs[0].task_type if len(tasks) == 1 else None, torch.bfloat16)
    names = [f"input_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.add_weighted_adapter(names, weights, "default", combination_type=combination_type,
                                    svd_rank=svd_rank, svd_clamp=svd_clamp)
    config = peft_model.peft_config["default"]
    if config.base_model_name_or_path is None and base_name is not None:
        peft_model.peft_config["default"] = dataclasses.replace(config, base_model_name_or_path=str(base_name))
    with staged_directory(out, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
    config = peft_model.peft_config["default"]
    print(f"combined {len(adapters)} adapters ({combination_type}, weights {weights}) -> {out} (rank {config.r})")
    return 0
