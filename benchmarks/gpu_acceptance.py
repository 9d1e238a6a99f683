"""GPU acceptance: LoRA (bf16) and QLoRA training steps, lorakit next to PEFT (+ bitsandbytes), one GPU.

Usage: python -m benchmarks.gpu_acceptance [--model PATH] [--steps 30] [--batch-size 8] [--seq-len 256]

Trains the embedded SmolLM2-135M-Instruct (and, with --model, a local 1B-class folder too) on the
main job's data with r=16 all-linear, for each of: lorakit LoRA, PEFT LoRA, lorakit QLoRA (nf4),
PEFT QLoRA (bitsandbytes nf4). Same data, seed and initial adapter for the pair being compared.
Prints a table of median step time, tokens/s and peak GPU memory (torch.cuda.max_memory_allocated)
and checks that the two libraries' losses agree. Goals printed: step time <= 0.8x PEFT's, peak
memory <= 0.7x PEFT's (r=16 all-linear). Needs CUDA; exits 2 without it. Under 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def batches(tokenizer, n: int, batch_size: int, seq_len: int, device) -> list[dict[str, torch.Tensor]]:
    """Tokenized, padded batches of the main job's examples (prompt + answer, loss on everything)."""
    from lorakit.train import tasks

    texts = [e["instruction"] + "\n" + e["input"] + "\n" + e["output"] for e in tasks.generate_examples(n * batch_size, seed=0)]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                    "labels": labels.to(device)})
    return out


def build(library: str, quantized: bool, model_path: str | None, device):
    """(model with an r=16 all-linear adapter, tokenizer) for `library` in {"lorakit", "peft"}."""
    from lorakit.hub import load_model_and_tokenizer

    torch.manual_seed(0)
    config = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    if library == "lorakit":
        from lorakit import LoraConfig, get_peft_model

        base, tokenizer = load_model_and_tokenizer(model_path, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(**config), quantize="nf4" if quantized else None)
        return model.to(device), tokenizer
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, tokenizer = load_model_and_tokenizer(model_path, dtype=torch.bfloat16)
    from lorakit.hub import resolve_model_dir

    kwargs = {"dtype": torch.bfloat16}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(model_path), local_files_only=True, **kwargs)
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    return model.to(device), tokenizer


def measure(library: str, quantized: bool, model_path: str | None, args, device) -> dict:
    model, tokenizer = build(library, quantized, model_path, device)
    model.train()
    data = batches(tokenizer, args.steps, args.batch_size, args.seq_len, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for batch in data:
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    step = statistics.median(times[3:] or times)  # the first steps warm the kernels up
    tokens = sum(int(b["attention_mask"].sum()) for b in data) / len(data)
    result = {"step_s": step, "tokens_per_s": tokens / step, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
              "losses": losses}
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a local 1B-class model folder, run after the embedded model")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    failures = 0
    for model_path in [None] + ([args.model] if args.model else []):
        name = model_path or "SmolLM2-135M-Instruct"
        for quantized in (False, True):
            kind = "QLoRA nf4" if quantized else "LoRA bf16"
            ours = measure("lorakit", quantized, model_path, args, device)
            theirs = measure("peft", quantized, model_path, args, device)
            time_ratio, mem_ratio = ours["step_s"] / theirs["step_s"], ours["peak_mib"] / theirs["peak_mib"]
            gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
            agree = gap <= 0.05 * max(1.0, abs(theirs["losses"][0]))
            print(f"\n{name}, {kind}, r=16 all-linear, batch {args.batch_size} x {args.seq_len}")
            print(f"{'':10} {'step ms':>9} {'tokens/s':>10} {'peak MiB':>9}")
            for label, r in (("lorakit", ours), ("PEFT", theirs)):
                print(f"{label:10} {1000 * r['step_s']:>9.1f} {r['tokens_per_s']:>10.0f} {r['peak_mib']:>9.0f}")
            print(f"step time {time_ratio:.3f}x PEFT (goal <= 0.8: {'met' if time_ratio <= 0.8 else 'not met'}); "
                  f"peak memory {mem_ratio:.3f}x PEFT (goal <= 0.7: {'met' if mem_ratio <= 0.7 else 'not met'}); "
                  f"losses agree within {gap:.4f}: {'yes' if agree else 'NO'}")
            failures += not agree
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
