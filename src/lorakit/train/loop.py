"""The training loop: `lorakit train` and `lorakit.train.train(...)`.

Usage: lorakit train --data my.jsonl --out runs/mine [--model ./my-model] [--r 16 --lora-alpha 32]
       torchrun --standalone --nproc_per_node=2 -m lorakit.cli -- train --data my.jsonl --out runs/mine
       (the `--` stops torchrun from reading `--r` as an abbreviation of its own flags)

One optimizer step consumes a global batch of batch_size * world_size * grad_accum examples,
taken in a seeded order; rank k of N takes its slice of it. The loss is the mean over every
response token of the global batch (each rank divides its token-loss sum by the global token
count), so N processes reach the same adapter as one process with the same global batch.

Files written under `out/`:
    run_config.yaml   every setting of the run, as resolved
    metrics.jsonl     one JSON object per logged step and per evaluation
    checkpoints/step-NNNNNNN/   adapter + trainer_state.pt (optimizer, scheduler, RNG, step)
    adapter/          the final adapter (PEFT format)
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from .. import adapter_format
from ..files import atomic_write
from ..config import LoraConfig
from ..peft_model import PeftModel, get_peft_model
from . import data as data_mod

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.pt"


# --- distributed --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs need no grad hack)."""
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(model, lr: float, loraplus_ratio: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups: every trainable parameter at `lr`, or with LoRA+ the B factors at lr * ratio."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not loraplus_ratio:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    is_b = lambda name: ".lora_B." in name or ".lora_embedding_B." in name  # noqa: E731
    return [{"params": [p for n, p in trainable if not is_b(n)], "lr": lr},
            {"params": [p for n, p in trainable if is_b(n)], "lr": lr * loraplus_ratio}]


# --- schedule -----------------------------------------------------------------------------------

def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def global_batches(n_examples: int, global_batch: int, seed: int, start_step: int, total_steps: int) -> Iterator[list[int]]:
    """Example indices of each optimizer step, from `start_step`: a fresh seeded shuffle per epoch."""
    steps_per_epoch = max(1, n_examples // global_batch)
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield order[pos * global_batch:(pos + 1) * global_batch]


# --- checkpoints --------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out: Path, step: int, peft_model: PeftModel, optimizer, scheduler, keep: int = 2) -> Path:
    """Write adapter + trainer state into a temporary folder, then rename it into place."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_NAME).is_file())
    return done[-1] if done else None


# --- evaluation ---------------------------------------------------------------------------------

def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    logits = logits[:, :-1]  # (B, T-1, V)
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
    return loss, int(mask.sum())


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, ctx: Dist, autocast) -> float:
    """Mean validation loss per response token, over all ranks' shards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    shard = examples[ctx.rank::ctx.world]
    for i in range(0, len(shard), batch_size):
        loss, n = token_loss_sum(model, data_mod.collate(shard[i:i + batch_size], pad_id), autocast)
        total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = ctx.sum(total), ctx.sum(count)
    return total / max(count, 1)


# --- the command --------------------------------------------------------------------------------

def train(
    *,
    data: str,
    out: str = "runs/lorakit",
    model: str | None = None,
    val_data: str | None = None,
    val_fraction: float = 0.05,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | None = None,
    lora_dropout: float = 0.05,
    use_rslora: bool = False,
    epochs: int = 1,
    max_steps: int = 0,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 2e-4,
    loraplus_ratio: float = 0.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_seq_len: int = 512,
    grad_clip: float = 1.0,
    gradient_checkpointing: bool = False,
    precision: Literal["fp32", "bf16"] = "fp32",
    quantize: Literal["none", "nf4"] = "none",
    double_quant: bool = False,
    seed: int = 0,
    log_every: int = 1,
    eval_every: int = 0,
    save_every: int = 0,
    resume: bool = False,
    quiet: bool = False,
    **lora_options: Any,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on a JSON Lines file and save it.

    Args:
        data: Training data: a JSON Lines file of Alpaca ({instruction, input, output}), chat
            ({messages}) or plain ({text}) records.
        out: Run directory: adapter/, checkpoints/, metrics.jsonl, run_config.yaml.
        model: A local Hugging Face model folder; the embedded SmolLM2-135M-Instruct when omitted.
        val_data: Validation file; otherwise --val-fraction of the training data is held out.
        val_fraction: Share of the training data held out for validation when --val-data is not given.
        r: LoRA rank.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        target_modules: Comma-separated module names, or all-linear; the architecture's default when omitted.
        lora_dropout: Dropout on the LoRA path.
        use_rslora: Scale by alpha / sqrt(r).
        epochs: Passes over the training data (ignored when --max-steps is set).
        max_steps: Optimizer steps to run; 0 means epochs * steps per epoch.
        batch_size: Examples per micro-batch per process.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        loraplus_ratio: LoRA+: lora_B (and lora_embedding_B) train with lr times this ratio (e.g. 16); 0 is off.
        warmup_steps: Steps of linear warm-up before cosine decay to 0.
        weight_decay: AdamW weight decay.
        max_seq_len: Longer examples are truncated to this many tokens.
        grad_clip: Clip the gradient norm to this value; 0 disables.
        gradient_checkpointing: Recompute activations in backward to save memory (sets use_cache=False).
        precision: fp32, or bf16 autocast.
        quantize: nf4 stores every Linear except the output head in 4 bits (QLoRA).
        double_quant: With --quantize nf4, also quantize the 4-bit scales (about 0.37 bit/weight less).
        seed: Seed for data order, initialisation and dropout.
        log_every: Write a metrics line every N steps.
        eval_every: Validation loss every N steps (0: only at the end).
        save_every: Checkpoint every N steps (0: no intermediate checkpoints).
        resume: Continue from the newest checkpoint in --out.
        quiet: No progress bar.
        **lora_options: Any other `LoraConfig` field: use_dora, init_lora_weights, lora_bias, bias,
            layers_to_transform, layers_pattern, rank_pattern, alpha_pattern, modules_to_save,
            exclude_modules (on the command line each is a flag, e.g. --use-dora, --rank-pattern
            q_proj=16, --init-lora-weights gaussian; in the YAML file a key).

    Returns:
        A summary: steps, final train and validation loss, seconds, adapter path.
    """
    settings = {k: v for k, v in locals().items() if k != "lora_options"} | lora_options
    ctx = Dist.setup()
    out_dir = Path(out)
    random.seed(seed)
    torch.manual_seed(seed)

    from ..hub import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(model)
    train_raw, val_raw = data_mod.load_splits(data, val_path=val_data, val_fraction=0.0 if val_data else val_fraction,
                                              seed=seed)
    train_set = data_mod.tokenize_examples(train_raw, tokenizer, max_seq_len)
    val_set = data_mod.tokenize_examples(val_raw, tokenizer, max_seq_len) if val_raw else []
    targets: list[str] | str | None = target_modules
    if targets and len(targets) == 1 and targets[0] in ("all-linear",):
        targets = targets[0]
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=lora_dropout,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **lora_options)
    peft_model = get_peft_model(base, config, quantize=None if quantize == "none" else quantize,
                                double_quant=double_quant)
    if gradient_checkpointing:
        enable_gradient_checkpointing(base)
    peft_model.train()

    global_batch = batch_size * ctx.world * grad_accum
    steps_per_epoch = max(1, len(train_set) // global_batch)
    total_steps = max_steps or epochs * steps_per_epoch
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(peft_model, lr, loraplus_ratio), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))
    net = peft_model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(peft_model)

    start = 0
    if resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        _, tensors = adapter_format.read_adapter(ckpt)
        adapter_format.load_weights(peft_model.base_model, "default", tensors, source=str(ckpt))
        state = torch.load(ckpt / STATE_NAME, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = settings | {"target_modules": config.target_modules, "world_size": ctx.world,
                               "global_batch": global_batch, "total_steps": total_steps,
                               "train_examples": len(train_set), "val_examples": len(val_set)}
        import yaml

        atomic_write(out_dir / "run_config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
        if not quiet:
            peft_model.print_trainable_parameters()
    metrics = open(out_dir / "metrics.jsonl", "a") if ctx.main else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    pad_id = data_mod.pad_token_id(tokenizer)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=quiet or not ctx.main, unit="step", dynamic_ncols=True)
    t0, tokens_seen, last_loss, val_loss = time.perf_counter(), 0, float("nan"), None
    val_losses: list[float] = []
    eval_seconds = 0.0
    for step, indices in enumerate(global_batches(len(train_set), global_batch, seed, start, total_steps), start):
        mine = indices[ctx.rank::ctx.world]  # this rank's share, split into micro-batches
        micro = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        batches = [data_mod.collate([train_set[j] for j in m], pad_id) for m in micro]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        global_tokens = ctx.sum(local_tokens)
        loss_total = 0.0
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1 or ctx.world == 1
            with (nullcontext() if sync else net.no_sync()):
                loss_sum, _ = token_loss_sum(net, batch, autocast)
                # DDP averages gradients over ranks: scale by world so the result is sum / global tokens
                (loss_sum * ctx.world / global_tokens).backward()
            loss_total += float(loss_sum.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = ctx.sum(loss_total) / global_tokens
        tokens_seen += int(ctx.sum(sum(int(b["attention_mask"].sum()) for b in batches)))
        done = step + 1
        elapsed = time.perf_counter() - t0
        if ctx.main:
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{tokens_seen / elapsed:.0f}")
            bar.update(1)
            if done % log_every == 0 or done == total_steps:
                record = {"step": done, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "tokens": tokens_seen, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
        if eval_every and done % eval_every == 0 and done != total_steps and val_set:
            t_eval = time.perf_counter()
            val_loss = evaluate(peft_model, val_set, batch_size, pad_id, ctx, autocast)
            eval_seconds += time.perf_counter() - t_eval
            val_losses.append(val_loss)
            _log_eval(metrics, bar, done, val_loss)
        if save_every and done % save_every == 0 and ctx.main:
            save_checkpoint(out_dir, done, peft_model, optimizer, scheduler)
    bar.close()
    train_seconds = time.perf_counter() - t0 - eval_seconds
    if val_set:
        val_loss = evaluate(peft_model, val_set, batch_size, pad_id, ctx, autocast)
        val_losses.append(val_loss)
        _log_eval(metrics, None, total_steps, val_loss)
    adapter_path = out_dir / "adapter"
    if ctx.main:
        peft_model.save_pretrained(str(adapter_path))
        metrics.close()
    if ctx.world > 1:
        dist.barrier()
    trainable, _ = peft_model.get_nb_trainable_parameters()
    summary = {"steps": total_steps, "train_loss": last_loss, "val_loss": val_loss,
               "best_val_loss": min(val_losses) if val_losses else None, "trainable_params": trainable,
               "seconds_per_step": train_seconds / max(1, total_steps - start),
               "seconds": time.perf_counter() - t0, "adapter": str(adapter_path)}
    if ctx.main and not quiet:
        print(json.dumps(summary))
    return summary


def _log_eval(metrics, bar, step: int, val_loss: float) -> None:
    if metrics is None:
        return
    metrics.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
    metrics.flush()
    if bar is not None:
        bar.write(f"step {step}: val_loss {val_loss:.4f}")


# The CLI and the YAML file reach every other LoraConfig field through **lora_options.
train.config_fields = (LoraConfig, ("task_type", "peft_type", "base_model_name_or_path", "inference_mode",
                                    "fan_in_fan_out"))
