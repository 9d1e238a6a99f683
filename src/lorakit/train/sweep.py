"""Rank sweep: one adapter per rank, same data, seed and steps, and a table to choose from.

Usage: lorakit sweep --data my.jsonl --ranks 4,8,16,32 [--out runs/sweep] [any `lorakit train` flag]

Each rank trains in a fresh process (so its peak memory is its own), with lora_alpha = 2r by
default ("2r"), a fixed alpha ("fixed", --lora-alpha), or rsLoRA with alpha = 2r ("rslora").
Writes `sweep.txt`, `sweep.csv` and `sweep.png` (validation loss against step per rank, and final
validation loss against rank) under --out, and recommends the smallest rank whose best
validation loss is within --tolerance (relative) of the best rank's.
"""

from __future__ import annotations

import csv
import io as _io
import json
import multiprocessing
import resource
from pathlib import Path
from typing import Any, Literal

from ..files import atomic_write
from .loop import train

COLUMNS = ("rank", "lora_alpha", "trainable_params", "final_train_loss", "final_val_loss", "best_val_loss",
           "seconds_per_step", "peak_memory_mib", "adapter_bytes")


def _train_one(kwargs: dict[str, Any], queue) -> None:
    """Child process: train one rank, report its summary and peak RSS."""
    try:
        summary = train(**kwargs)
        summary["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        queue.put(("ok", summary))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"{type(err).__name__}: {err}"))


def recommend(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The smallest-rank row whose best validation loss is within `tolerance` of the lowest."""
    best = min(row["best_val_loss"] for row in rows)
    return min((row for row in rows if row["best_val_loss"] <= best * (1 + tolerance)), key=lambda row: row["rank"])


def sweep(
    *,
    data: str,
    ranks: list[int] = [4, 8, 16, 32],  # noqa: B006 - read only; the CLI shows it as the default
    alpha: Literal["2r", "fixed", "rslora"] = "2r",
    lora_alpha: float = 16,
    tolerance: float = 0.02,
    out: str = "runs/sweep",
    max_steps: int = 100,
    eval_every: int = 10,
    plot: bool = True,
    **train_args: Any,
) -> dict[str, Any]:
    """Train one adapter per rank and compare them.

    Args:
        data: Training data (JSON Lines), as for `lorakit train`.
        ranks: Comma-separated ranks to try.
        alpha: How alpha follows the rank: 2r, fixed (--lora-alpha), or rslora (alpha 2r, scaling alpha/sqrt(r)).
        lora_alpha: The alpha of every rank with --alpha fixed.
        tolerance: Recommend the smallest rank whose best validation loss is within this fraction of the lowest.
        out: Sweep directory: one run per rank under r<rank>/, and sweep.txt, sweep.csv, sweep.png.
        max_steps: Optimizer steps per rank.
        eval_every: Validation loss every N steps (the curves of the plot).
        plot: Write sweep.png (needs matplotlib).
        train_args: Any other `lorakit train` setting (model, batch_size, lr, target_modules, ...).

    Returns:
        {"rows": [...], "recommended_rank": int}.

    Raises:
        ValueError: no ranks, or a rank's training failed (its error is named).
    """
    if not ranks:
        raise ValueError("--ranks is empty")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    rows = []
    for rank in ranks:
        rank_alpha = lora_alpha if alpha == "fixed" else 2 * rank
        kwargs = train_args | dict(data=data, out=str(out_dir / f"r{rank}"), r=rank, lora_alpha=rank_alpha,
                                   use_rslora=alpha == "rslora", max_steps=max_steps, eval_every=eval_every)
        print(f"rank {rank}: training {max_steps} steps (lora_alpha {rank_alpha})", flush=True)
        queue = context.Queue()
        child = context.Process(target=_train_one, args=(kwargs, queue))
        child.start()
        status, summary = queue.get()
        child.join()
        if status != "ok":
            raise ValueError(f"rank {rank}: training failed: {summary}")
        adapter = Path(summary["adapter"])
        rows.append({
            "rank": rank, "lora_alpha": rank_alpha, "trainable_params": summary["trainable_params"],
            "final_train_loss": summary["train_loss"], "final_val_loss": summary["val_loss"],
            "best_val_loss": summary["best_val_loss"], "seconds_per_step": summary["seconds_per_step"],
            "peak_memory_mib": summary["peak_memory_mib"],
            "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()),
        })
    if any(row["best_val_loss"] is None for row in rows):
        raise ValueError("no validation loss: give --val-data or a --val-fraction above 0")
    choice = recommend(rows, tolerance)
    table = format_table(rows)
    verdict = (f"recommended rank: {choice['rank']} (smallest rank whose best validation loss "
               f"{choice['best_val_loss']:.4f} is within {100 * tolerance:g}% of the lowest, "
               f"{min(r['best_val_loss'] for r in rows):.4f})")
    atomic_write(out_dir / "sweep.txt", (table + "\n\n" + verdict + "\n").encode())
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "sweep.csv", buffer.getvalue().encode())
    if plot:
        plot_sweep(out_dir, rows)
    print(table + "\n\n" + verdict)
    return {"rows": rows, "recommended_rank": choice["rank"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'rank':>5} {'alpha':>6} {'params':>11} {'train':>8} {'val':>8} {'best val':>9} {'s/step':>7} {'peak MiB':>9} {'adapter':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['rank']:>5} {row['lora_alpha']:>6g} {row['trainable_params']:>11,} {row['final_train_loss']:>8.4f} "
                     f"{row['final_val_loss']:>8.4f} {row['best_val_loss']:>9.4f} {row['seconds_per_step']:>7.3f} "
                     f"{row['peak_memory_mib']:>9.0f} {row['adapter_bytes'] / 1024:>8.0f}KB")
    return "\n".join(lines)


def plot_sweep(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """sweep.png: validation loss against step for each rank, and final validation loss against rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        lines = (out_dir / f"r{row['rank']}" / "metrics.jsonl").read_text().splitlines()
        points = [json.loads(line) for line in lines if '"val_loss"' in line]
        curves.plot([p["step"] for p in points], [p["val_loss"] for p in points], marker="o", label=f"r={row['rank']}")
    curves.set(xlabel="step", ylabel="validation loss", title="validation loss by step")
    curves.legend()
    finals.plot([row["rank"] for row in rows], [row["final_val_loss"] for row in rows], marker="o")
    finals.set_xscale("log", base=2)
    finals.set(xlabel="rank", ylabel="final validation loss", title="final validation loss by rank")
    fig.tight_layout()
    path = out_dir / "sweep.png"
    png = _io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write(path, png.getvalue())
    plt.close(fig)
    return path


sweep.extends = train  # the CLI adds train's flags (those sweep does not set itself) as **train_args
sweep.extends_exclude = ("r", "use_rslora", "resume")
