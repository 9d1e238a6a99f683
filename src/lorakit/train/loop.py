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
    metrics.jsonl     one JSON object per logged step and per evaluation (tokens and
                      elapsed_s count from the run's start, across a resume); with --report-to
                      the same figures go to tensorboard/ (event files), wandb or mlflow
    loss.png          train and validation loss against step (needs matplotlib, the `plot` extra)
    checkpoints/step-NNNNNNN/   adapter + trainer_state.pt (optimizer, scheduler, RNG, step)
    adapter/          the final adapter (PEFT format)
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import adapter_format, devices
from ..config import CONFIG_NAME, LoraConfig
from ..files import atomic_write, discard_directory, remove_temporaries, staged_directory
from ..peft_model import PeftModel, get_peft_model
from . import data as data_mod
from . import packing, reporting
from . import summary as summary_mod
from .distributed import (Dist, adapter_state, load_optimizer_state, local_base_bytes, no_sync,
                          optimizer_state, shard)
from .recipe import SECTIONS, DataSettings, ModelSettings, OptimSettings, Recipe, RunSettings

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.pt"
CHECKPOINT_FILES = (STATE_NAME, adapter_format.WEIGHTS_NAME, CONFIG_NAME)  # a complete checkpoint


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs need no grad hack)."""
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
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
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, peft_model: PeftModel, optimizer, scheduler, ctx: Dist,
                    keep: int = 2, progress: dict[str, float] | None = None) -> Path:
    """Write `checkpoints/step-NNNNNNN` (adapter + trainer state) as a whole, then drop all but the
    `keep` newest checkpoints. Every rank calls this (gathering FSDP shards is collective); rank 0
    writes.

    The folder is built under a temporary name and renamed into place (an existing one swapped,
    `files.staged_directory`); older ones are renamed aside before they are deleted
    (`files.discard_directory`). So a kill at any instant leaves every `step-*` complete; what it
    may leave behind are temporaries, which `remove_run_leftovers` removes at the next start.

    Returns:
        The checkpoint's folder.
    """
    adapter = adapter_state(peft_model)
    optim_state = optimizer_state(peft_model, optimizer)
    final = out / CHECKPOINTS / f"step-{step:07d}"
    if not ctx.main:
        return final
    state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "progress": progress or {}}  # tokens and wall seconds so far, carried on by a resume
    with staged_directory(final, overwrite=True) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=adapter)
        torch.save(state, tmp / STATE_NAME)
    newest = checkpoints(out)[-keep:]
    for old in (out / CHECKPOINTS).glob("step-*"):
        if old not in newest:
            discard_directory(old)
    return final


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints under `out` (`step-<number>` folders holding the trainer state, an
    adapter config and its weights), oldest first."""
    found = []
    for folder in (out / CHECKPOINTS).glob("step-*"):
        number = folder.name.removeprefix("step-")
        if number.isdigit() and all((folder / name).is_file() for name in CHECKPOINT_FILES):
            found.append((int(number), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under `out`, None when there is none."""
    done = checkpoints(out)
    return done[-1] if done else None


def remove_run_leftovers(out: Path) -> list[str]:
    """Remove what a killed run left in `out`: temporaries of its files (`run_config.yaml`,
    `metrics.jsonl`), of its checkpoints, of checkpoints being deleted, and of the final
    adapter; also `.tmp-step-*` folders of earlier lorakit versions. Nothing else is touched.

    Returns:
        The paths removed, relative to `out`.
    """
    removed = []
    for folder in (out, out / CHECKPOINTS, out / "adapter"):
        removed += [str((folder / name).relative_to(out)) for name in remove_temporaries(folder)]
    for legacy in sorted((out / CHECKPOINTS).glob(".tmp-step-*")):
        shutil.rmtree(legacy, ignore_errors=True)
        removed.append(str(legacy.relative_to(out)))
    return removed


# --- evaluation ---------------------------------------------------------------------------------

def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "position_ids" in batch:  # packed rows: no attention mask, no cache (see `packing`)
        inputs = packing.model_inputs(batch)
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with autocast:
        logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    logits = logits[:, :-1]  # (B, T-1, V)
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
    return loss, int(mask.sum())


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, ctx: Dist, autocast) -> float:
    """Mean validation loss per response token, over all ranks' shards. Every rank runs the
    same number of forwards (FSDP's gathers are collective): a rank whose shard is shorter runs
    its last batch again and does not count it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    shard = examples[ctx.rank::ctx.world]
    per_rank = -(-len(examples) // ctx.world)  # the longest shard
    for i in range(0, per_rank, batch_size):
        part = shard[i:i + batch_size]
        loss, n = token_loss_sum(model, data_mod.collate(part or shard[-batch_size:] or examples[:1], pad_id), autocast)
        if part:
            total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = ctx.sum(total), ctx.sum(count)
    return total / max(count, 1)


# --- the command --------------------------------------------------------------------------------

def train(
    model: ModelSettings | str | None = None,
    lora: LoraConfig | None = None,
    data: DataSettings | str | None = None,
    optim: OptimSettings | None = None,
    run: RunSettings | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on your data (JSON Lines, JSON, Parquet, CSV, a datasets folder) and save it.

    Takes the five records of a `Recipe` (each defaulting to its record's defaults), and any
    field of them by its flat name, which overrides the records: `train(data="my.jsonl", r=16)`
    is `train(data=DataSettings(data="my.jsonl"), lora=lora_config(r=16))`. Every field is a
    `lorakit train` flag (see `lorakit train --help` and `train.recipe`).

    Args:
        model: The base model record, or a model folder (the `model` field).
        lora: The adapter's LoraConfig (`recipe.lora_config` gives the trainer's defaults).
        data: The data record, or the training files (the `data` field: a path or a list).
        optim: Steps, batches and optimizer settings.
        run: Output folder, logging, checkpoints, seed.
        **flags: Fields of any record, by name (r, lr, max_steps, out, use_dora, ...).

    Returns:
        A summary: steps, final train and validation loss, seconds, adapter path; on rank 0
        also the whole run's tokens, wall_seconds, tokens_per_s, best_val_loss and its
        best_val_step (from metrics.jsonl, so right after a resume) and loss_plot (or None).

    Raises:
        TypeError: a flag no record has.
        lorakit.ConfigError: a LoRA field has a bad value (before the model loads).
        reporting.ReportError: --report-to names a tracker that is not installed (before the model loads).
    """
    recipe = resolve_recipe(model, lora, data, optim, run, flags)
    if not recipe.data.data:
        raise ValueError("no training data: give --data FILE")
    reporting.check_report_to(recipe.run.report_to)
    ctx = Dist.setup(recipe.model.device)
    out_dir = Path(recipe.run.out)
    if ctx.main:
        remove_run_leftovers(out_dir)  # what a killed run left half-written
    seed = recipe.run.seed
    random.seed(seed)
    torch.manual_seed(seed)

    train_rows, val_rows = read_data(recipe.data, seed)  # every row checked before the model loads
    peft_model, tokenizer = build_model(recipe, ctx.device)
    train_set, val_set = tokenize_data(recipe.data, train_rows, val_rows, tokenizer, peft_model)
    ckpt = latest_checkpoint(out_dir) if recipe.run.resume else None
    if ckpt is not None:  # the adapter's weights before sharding, the rest once the optimizer exists
        _, tensors = adapter_format.read_adapter(ckpt)
        adapter_format.load_weights(peft_model.base_model, "default", tensors, source=str(ckpt))
    if ctx.main and not recipe.run.quiet:
        peft_model.print_trainable_parameters()
    net = shard(peft_model, recipe.model.strategy, ctx, recipe.model.precision)
    optim = recipe.optim
    global_batch = optim.batch_size * ctx.world * optim.grad_accum
    total_steps = optim.max_steps or optim.epochs * max(1, len(train_set) // global_batch)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(peft_model, optim.lr, optim.loraplus_ratio), lr=optim.lr,
                                  weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.warmup_steps, total_steps))
    start, progress = resume_from(ckpt, peft_model, optimizer, scheduler) if ckpt is not None else (0, {})
    base_bytes = ctx.gather(local_base_bytes(peft_model))
    metrics_path, reporter = out_dir / "metrics.jsonl", None
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = dict(device=str(ctx.device), world_size=ctx.world, global_batch=global_batch,
                        total_steps=total_steps, train_examples=len(train_set), val_examples=len(val_set),
                        base_bytes_per_rank=[int(b) for b in base_bytes])
        write_run_config(out_dir, recipe, **resolved)
        reporter = reporting.Reporter(out_dir, recipe.run.report_to, start, config=recipe.to_flags() | resolved)
    tokens_before, seconds_before = int(progress.get("tokens", 0)), float(progress.get("elapsed_s", 0.0))
    autocast = devices.autocast(ctx.device, recipe.model.precision)
    pad_id = data_mod.pad_token_id(tokenizer)
    run = recipe.run

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=run.quiet or not ctx.main, unit="step", dynamic_ncols=True)
    t0, tokens_seen, last_loss, val_loss = time.perf_counter(), tokens_before, float("nan"), None
    val_losses: list[float] = []
    eval_seconds = 0.0
    for step, indices in enumerate(global_batches(len(train_set), global_batch, seed, start, total_steps), start):
        mine = indices[ctx.rank::ctx.world]  # this rank's share, split into micro-batches
        micro = [mine[i:i + optim.batch_size] for i in range(0, len(mine), optim.batch_size)]
        parts = [[train_set[j] for j in m] for m in micro]
        batches = [make_batch(part, pad_id) for part in parts]
        last_loss, grad_norm = optimizer_step(net, peft_model, batches, ctx, autocast, params, optimizer, scheduler,
                                              optim.grad_clip)
        tokens_seen += int(ctx.sum(sum(real_tokens(part) for part in parts)))
        done = step + 1
        elapsed = seconds_before + time.perf_counter() - t0
        if ctx.main:
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{tokens_seen / elapsed:.0f}")
            bar.update(1)
            if done % run.log_every == 0 or done == total_steps:
                record = {"step": done, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "tokens": tokens_seen, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record["peak_memory_mib"] = reporting.peak_memory_mib(ctx.device)
                reporter.log(record)
        if run.eval_every and done % run.eval_every == 0 and done != total_steps and val_set:
            t_eval = time.perf_counter()
            val_loss = evaluate(peft_model, val_set, optim.batch_size, pad_id, ctx, autocast)
            eval_seconds += time.perf_counter() - t_eval
            val_losses.append(val_loss)
            _log_eval(reporter, bar, done, val_loss, seconds_before + time.perf_counter() - t0)
        if run.save_every and done % run.save_every == 0:
            save_checkpoint(out_dir, done, peft_model, optimizer, scheduler, ctx,
                            progress={"tokens": tokens_seen, "elapsed_s": seconds_before + time.perf_counter() - t0})
    bar.close()
    train_seconds = time.perf_counter() - t0 - eval_seconds
    if val_set:
        val_loss = evaluate(peft_model, val_set, optim.batch_size, pad_id, ctx, autocast)
        val_losses.append(val_loss)
        _log_eval(reporter, None, total_steps, val_loss, seconds_before + time.perf_counter() - t0)
    adapter_path = out_dir / "adapter"
    final_state = adapter_state(peft_model)  # (collective under FSDP)
    if ctx.main:
        peft_model.save_pretrained(str(adapter_path), state_dict=final_state)
        reporter.close()
    ctx.close()
    trainable, _ = peft_model.get_nb_trainable_parameters()
    summary = {"steps": total_steps, "train_loss": last_loss, "val_loss": val_loss,
               "best_val_loss": min(val_losses) if val_losses else None, "trainable_params": trainable,
               "seconds_per_step": train_seconds / max(1, total_steps - start),
               "seconds": time.perf_counter() - t0, "adapter": str(adapter_path)}
    if ctx.main:  # the whole run's figures (a resumed run's earlier steps included), from metrics.jsonl
        figures = summary_mod.run_figures(metrics_path)
        plot = summary_mod.plot_loss(metrics_path, out_dir / "loss.png")
        summary |= {key: figures[key] for key in ("tokens", "wall_seconds", "tokens_per_s", "best_val_loss",
                                                  "best_val_step")}
        summary["loss_plot"] = str(plot) if plot is not None else None
        if not run.quiet:
            print(summary_mod.format_summary(figures, adapter_path, plot))
    return summary


def resolve_recipe(model, lora, data, optim, run, flags: dict[str, Any]) -> Recipe:
    """The run's records: those given, a string `model`/`data` as that field, `flags` over them.

    Raises:
        TypeError: a flag no record has.
    """
    if isinstance(model, str):
        flags = {"model": model} | flags
        model = None
    if isinstance(data, (str, list, tuple)):
        flags = {"data": data} | flags
        data = None
    given = {name: record for name, record in
             dict(model=model, lora=lora, data=data, optim=optim, run=run).items() if record is not None}
    recipe = Recipe(**given)
    return recipe.replace(**flags) if flags else recipe


def build_model(recipe: Recipe, device: torch.device) -> tuple[PeftModel, Any]:
    """The base model (loaded in the recipe's dtype, quantized if asked) with the recipe's adapter
    (float32), on `device`, in train mode."""
    from ..hub import load_model_and_tokenizer

    settings = recipe.model
    base, tokenizer = load_model_and_tokenizer(settings.model, dtype=devices.resolve_dtype(settings.dtype, device))
    quantize = None if settings.quantize == "none" else settings.quantize
    peft_model = get_peft_model(base, recipe.lora, quantize=quantize, double_quant=settings.double_quant)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    peft_model.to(device)
    peft_model.train()
    return peft_model, tokenizer


def read_data(settings: DataSettings, seed: int):
    """The training and validation rows (memory-mapped `datasets.Dataset`s), every row's shape
    checked (`data.load_data`).

    Raises:
        data.DataError: a missing or malformed file (file, row, what is wrong).
    """
    return data_mod.load_data(settings.data, val=settings.val_data or None,
                              val_fraction=0.0 if settings.val_data else settings.val_fraction, seed=seed,
                              fields=settings.data_field or None)


def tokenize_data(settings: DataSettings, train_rows, val_rows, tokenizer, model) -> tuple[list[dict], list[dict]]:
    """The tokenized training examples (packed into rows with `settings.packing`, after checking
    the model keeps packed examples apart) and validation examples (never packed)."""
    train_set = data_mod.tokenize_examples(train_rows, tokenizer, settings.max_seq_len)
    val_set = data_mod.tokenize_examples(val_rows, tokenizer, settings.max_seq_len) if len(val_rows) else []
    if settings.packing:
        packing.check_packing_support(model)
        train_set = packing.pack_examples(train_set, settings.max_seq_len)
    return train_set, val_set


def make_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of examples (padded, with an attention mask), or of packed rows (they carry
    "lengths": position ids restarting per example, no mask; see `packing`)."""
    if features and "lengths" in features[0]:
        return packing.collate_packed(features, pad_id)
    return data_mod.collate(features, pad_id)


def real_tokens(features: list[dict]) -> int:
    """Tokens of the examples in `features`, padding left out."""
    return sum(len(f["input_ids"]) for f in features)


def optimizer_step(net, peft_model, batches: list[dict[str, torch.Tensor]], ctx: Dist, autocast, params, optimizer,
                   scheduler, grad_clip: float) -> tuple[float, float | None]:
    """One optimizer step over this rank's micro-batches: (mean loss per response token over the
    global batch, the gradient norm before clipping or None)."""
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    global_tokens = ctx.sum(local_tokens)
    loss_total = 0.0
    for k, batch in enumerate(batches):
        with no_sync(net, peft_model, sync=k == len(batches) - 1):
            loss_sum, _ = token_loss_sum(net, batch, autocast)
            # DDP averages gradients over ranks: scale by world so the result is sum / global tokens
            (loss_sum * ctx.world / global_tokens).backward()
        loss_total += float(loss_sum.detach())
    grad_norm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # (a DTensor under FSDP)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ctx.sum(loss_total) / global_tokens, grad_norm


def resume_from(ckpt: Path, peft_model: PeftModel, optimizer, scheduler) -> tuple[int, dict[str, float]]:
    """Load a checkpoint's optimizer, scheduler and RNG state (its adapter is loaded before
    sharding); the step it was taken at and the run's progress then (tokens, elapsed_s)."""
    state = torch.load(ckpt / STATE_NAME, weights_only=False)
    load_optimizer_state(peft_model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state.get("progress", {})


def write_run_config(out_dir: Path, recipe: Recipe, **resolved: Any) -> None:
    """run_config.yaml: every setting by its flag name, and what the run resolved (world size, steps)."""
    import yaml

    settings = recipe.to_flags()
    settings["target_modules"] = recipe.lora.target_modules
    atomic_write(out_dir / "run_config.yaml", yaml.safe_dump(settings | resolved, sort_keys=False).encode())


def _log_eval(reporter, bar, step: int, val_loss: float, elapsed: float) -> None:
    if reporter is None:
        return
    reporter.log({"step": step, "val_loss": val_loss, "elapsed_s": elapsed})
    if bar is not None:
        bar.write(f"step {step}: val_loss {val_loss:.4f}")


train.records = SECTIONS  # the CLI gives one flag per field of each record
