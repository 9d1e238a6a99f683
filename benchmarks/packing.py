"""Packing benchmark: training tokens/s with and without packing, on the main job's data.

Usage: python -m benchmarks.packing [--model tiny|embedded] [--steps N] [--batch-size B]
                                    [--max-seq-len T] [--examples N] [--attn sdpa|eager]

The data is the order-extraction task (`lorakit.train.tasks.generate_examples`), tokenized with
SmolLM2-135M-Instruct's tokenizer and chat template through `lorakit.train.data`. The model is a
random 4-layer Llama-style decoder over that tokenizer's vocabulary by default (`--model tiny`,
no download), or the embedded SmolLM2-135M-Instruct itself (`--model embedded`). Both variants
train the same LoRA adapter (r=8 on q_proj, v_proj) with AdamW:

    unpacked  B examples per step, padded to the longest (`data.collate`, attention_mask)
    packed    B rows per step of up to T tokens, several examples each (`packing.pack_examples`,
              `packing.collate_packed`, `packing.model_inputs`: positions restart, no mask)

A step is forward, loss (sum over response tokens / their count), backward and optimizer step.
After one warm-up step each, the variants alternate step by step, and each reports the median
step time; tokens/s is the median over steps of that step's real tokens (not padding) over its
time, response tokens/s the same for the tokens that carry loss. Nothing here is a threshold: it prints what it measured on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.train import data, packing, tasks


def load_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file the embedded model ships."""
    from transformers import AutoTokenizer

    from lorakit.hub import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def tiny_model(vocab: int, pad_id: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048,
                         pad_token_id=pad_id, attn_implementation=attn)
    return LlamaForCausalLM(config)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens: logits [B, T, V], labels [B, T]."""
    shifted = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    mask = shifted != data.IGNORE_INDEX  # [B, T-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), shifted[mask], reduction="mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="examples (unpacked) or rows (packed) per step")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = parser.parse_args()

    if args.model == "embedded":
        from lorakit.hub import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(None)
        base.set_attn_implementation(args.attn)
    else:
        tokenizer = load_tokenizer()
        base = tiny_model(len(tokenizer), data.pad_token_id(tokenizer), args.attn)
    pad_id = data.pad_token_id(tokenizer)
    features = data.tokenize_examples(tasks.generate_examples(args.examples, seed=0), tokenizer, args.max_seq_len)
    rows = packing.pack_examples(features, args.max_seq_len)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    packing.check_packing_support(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    b = args.batch_size
    variants = {
        "unpacked": [(data.collate(features[i:i + b], pad_id), features[i:i + b])
                     for i in range(0, len(features) - b + 1, b)],
        "packed": [(packing.collate_packed(rows[i:i + b], pad_id), rows[i:i + b])
                   for i in range(0, len(rows) - b + 1, b)],
    }
    if not variants["packed"]:
        raise SystemExit(f"{len(rows)} packed rows make no batch of {b}: raise --examples")

    def step(name: str, k: int) -> tuple[float, int, int, int]:
        batch, members = variants[name][k % len(variants[name])]
        start = time.perf_counter()
        if name == "packed":
            logits = model(**packing.model_inputs(batch)).logits
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_of(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        real = sum(len(m["input_ids"]) for m in members)
        response = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        return seconds, real, response, batch["input_ids"].numel()

    results: dict[str, list[tuple[float, int, int, int]]] = {name: [] for name in variants}
    for name in variants:  # warm-up
        step(name, 0)
    for k in range(args.steps):
        for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
            results[name].append(step(name, k + 1))

    print(f"model: {args.model} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters), "
          f"attention {args.attn}, {torch.get_num_threads()} threads, device cpu")
    print(f"data: {len(features)} order-extraction examples, mean {statistics.mean(len(f['input_ids']) for f in features):.0f}"
          f" tokens; packed into {len(rows)} rows of <= {args.max_seq_len}; batch {b}; {args.steps} timed steps each")
    print(f"{'variant':<10} {'tokens/step':>12} {'padded/step':>12} {'step s (median)':>16} {'tokens/s':>10} "
          f"{'response tok/s':>15}")
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        real = statistics.mean(r[1] for r in runs)
        padded = statistics.mean(r[3] for r in runs)
        tokens_s = statistics.median(r[1] / r[0] for r in runs)  # per step, then the median
        response_s = statistics.median(r[2] / r[0] for r in runs)
        print(f"{name:<10} {real:>12.0f} {padded:>12.0f} {seconds:>16.3f} {tokens_s:>10.0f} {response_s:>15.0f}")


if __name__ == "__main__":
    main()
