"""`lorakit merge`: fold an adapter into its base model and write a full Hugging Face model folder.

Usage: lorakit merge ADAPTER OUT [--base MODEL] [--dtype bf16|fp16|fp32] [--no-safe-merge]
                                 [--quantize nf4 [--double-quant]] [--overwrite]

The folder (config.json, model.safetensors, generation config, tokenizer) loads with
`AutoModelForCausalLM.from_pretrained(OUT)` and needs neither lorakit nor PEFT. It is written
into a temporary folder beside OUT and renamed into place, so OUT is either complete or absent.

The merge runs in float32 on the CPU: W' = W + scaling · B @ A, then the model is cast to
`dtype`. With `--quantize nf4` the base is first quantized as in training
(`get_peft_model(..., quantize="nf4")`), so the merged weights are dequant(NF4(W)) + ΔW: exactly
the model the adapter was trained with on a 4-bit base, rather than the float base plus ΔW.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from .files import staged_directory

__all__ = ["DTYPES", "merge"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# adapter task_type -> transformers auto class that loads the matching model (causal LMs: lorakit.hub)
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _load_base(base: str | None, task_type: str | None, dtype: torch.dtype):
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
    from lorakit.config import read_config
    from lorakit.peft_model import PeftModel

    config = read_config(adapter)
    base = base or config.base_model_name_or_path
    out_path, adapter_path = Path(out).resolve(), Path(adapter).resolve()
    inputs = [adapter_path] + ([Path(base).resolve()] if base and Path(base).exists() else [])
    if any(out_path == p or out_path in p.parents for p in inputs):
        raise ValueError(f"out {out} would overwrite its own input ({adapter if out_path == adapter_path else base})")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    model, tokenizer = _load_base(base, config.task_type, torch.float32)
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
