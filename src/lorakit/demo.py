"""The main job: fine-tune the embedded model on lorakit's shipped task and show what it learned.

Usage: lorakit demo [--out runs/demo] [--steps 30] [--device cuda]      (or: make demo)

1. Generate the order-extraction task (sentence -> fixed JSON record; see train/tasks.py):
   a training set and 100 held-out examples, written as Alpaca JSON Lines.
2. Score the base model (SmolLM2-135M-Instruct unless --model is given) on the held-out set:
   greedy answers, exact match of the JSON record.
3. Train a LoRA adapter with `lorakit.train.train` and save it.
4. Reload the adapter from disk onto a fresh base and score the same held-out set.
5. Print a few before/after answers, both scores, wall time and peak memory.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from . import devices


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def score_model(model, tokenizer, examples: list[dict], max_new_tokens: int, batch_size: int):
    """(predictions, Score) of greedy answers on task examples, prompted exactly as in training."""
    from .generate import generate_batch
    from .prompts import encode_prompt
    from .train import tasks

    prompts = [encode_prompt(example, tokenizer) for example in examples]
    predictions = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return predictions, tasks.score_predictions(predictions, [example["output"] for example in examples])


def demo(
    out: str = "runs/demo",
    model: str | None = None,
    n_train: int = 1000,
    n_eval: int = 100,
    steps: int = 30,
    batch_size: int = 8,
    lr: float = 2e-3,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | None = None,
    max_new_tokens: int = 64,
    eval_batch_size: int = 100,
    seed: int = 0,
    show: int = 3,
    device: devices.DeviceName = "auto",
    dtype: devices.DtypeName = "auto",
) -> dict[str, Any]:
    """Run the main job end to end: score, fine-tune, reload, score again.

    Args:
        out: Run directory (data/, adapter/, metrics.jsonl, demo_results.json).
        model: A local Hugging Face model folder; the embedded SmolLM2-135M-Instruct when omitted.
        n_train: Training examples to generate.
        n_eval: Held-out examples to score before and after.
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: Peak learning rate (cosine decay, short warm-up).
        r: LoRA rank.
        lora_alpha: LoRA alpha.
        target_modules: Modules to adapt; all-linear when omitted.
        max_new_tokens: Most tokens generated per answer (a record is about 50).
        eval_batch_size: Prompts per generation batch.
        seed: Seed for the task, data order and initialisation.
        show: How many before/after examples to print.
        device: auto (CUDA when present, then MPS, then CPU), cpu, cuda or mps, for scoring and training.
        dtype: The base model's dtype: auto is bf16 on CUDA and fp32 elsewhere; the adapter stays fp32.

    Returns:
        The figures: scores before and after, seconds per phase, peak memory (peak RSS; on
        CUDA also peak_cuda_gib, torch.cuda.max_memory_allocated), the device.

    Raises:
        lorakit.devices.DeviceError: an unknown device or dtype, or a device this machine lacks
            (before any work).
    """
    from .hub import load_model_and_tokenizer
    from .files import atomic_write
    from .peft_model import PeftModel
    from .train import data, tasks
    from .train.loop import train

    target = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype(dtype, target)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out_dir = Path(out)
    train_path, eval_path = tasks.write_splits(out_dir / "data", n_train, n_eval, seed=seed)
    held_out = data.read_jsonl(eval_path)
    print(f"task: {tasks.TASK_NAME}: {n_train} training / {len(held_out)} held-out examples in {out_dir / 'data'}")

    base, tokenizer = load_model_and_tokenizer(model, dtype=torch_dtype, device=target)
    t = time.perf_counter()
    before, before_score = score_model(base, tokenizer, held_out, max_new_tokens, eval_batch_size)
    eval_before_s = time.perf_counter() - t
    print(f"before fine-tuning: {before_score.summary()}  ({eval_before_s:.0f} s)")
    del base

    t = time.perf_counter()
    summary = train(data=str(train_path), out=str(out_dir), model=model, val_fraction=0.05, r=r, lora_alpha=lora_alpha,
                    target_modules=target_modules or ["all-linear"], lora_dropout=0.0, max_steps=steps,
                    batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 6), max_seq_len=160, seed=seed,
                    device=device, dtype=dtype)
    train_s = time.perf_counter() - t

    base, tokenizer = load_model_and_tokenizer(model, dtype=torch_dtype)
    tuned = PeftModel.from_pretrained(base, summary["adapter"]).to(target)  # reloaded from disk
    t = time.perf_counter()
    after, after_score = score_model(tuned, tokenizer, held_out, max_new_tokens, eval_batch_size)
    eval_after_s = time.perf_counter() - t

    for example, b, a in list(zip(held_out, before, after))[:show]:
        print("\n" + "-" * 78)
        print(f"sentence : {example['input']}" if example.get("input") else f"prompt   : {example['instruction']}")
        print(f"expected : {example['output']}")
        print(f"before   : {_one_line(b)}")
        print(f"after    : {_one_line(a)}")
    total_s = time.perf_counter() - start
    results = {
        "task": tasks.TASK_NAME, "held_out": len(held_out),
        "exact_match_before": before_score.exact_match, "exact_match_after": after_score.exact_match,
        "train_steps": steps, "train_seconds": round(train_s, 1), "eval_before_seconds": round(eval_before_s, 1),
        "eval_after_seconds": round(eval_after_s, 1), "total_seconds": round(total_s, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2), "adapter": summary["adapter"], "device": str(target),
    }
    if target.type == "cuda":
        results["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(target) / 2**30, 2)
    atomic_write(out_dir / "demo_results.json", (json.dumps(results, indent=2) + "\n").encode())
    print("\n" + "=" * 78)
    print(f"exact match on {len(held_out)} held-out examples: before {100 * before_score.exact_match:.0f}%"
          f"  ->  after {100 * after_score.exact_match:.0f}%")
    print(f"wall time {total_s / 60:.1f} min (training {train_s:.0f} s), peak memory {results['peak_rss_gib']} GiB;"
          f" adapter in {summary['adapter']}")
    return results


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
