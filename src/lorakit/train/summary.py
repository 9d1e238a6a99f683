"""The end of a training run: `loss.png` and a one-screen summary, both read from metrics.jsonl.

    figures = run_figures(out / "metrics.jsonl")      # steps, tokens, wall time, losses
    plot_loss(out / "metrics.jsonl", out / "loss.png")   # None (with a note) without matplotlib
    print(format_summary(figures, adapter=out / "adapter", plot=out / "loss.png"))

Both read the file rather than the loop's variables, so a resumed run reports the whole run: the
records of the steps before its checkpoint are in the file (the loop keeps `tokens` and
`elapsed_s` cumulative across a resume), the steps it redid are there once.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from ..files import atomic_write

PLOT_SIZE = (8.0, 4.5)  # inches; at PLOT_DPI the PNG is 800 x 450 pixels
PLOT_DPI = 100


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a metrics.jsonl, each in step order.

    A train record has "loss" (and "tokens", "elapsed_s", ...); an eval record has "val_loss".
    A line that is not JSON (cut short by a kill) is skipped; a missing file is two empty lists.
    """
    path = Path(path)
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        return steps, evals
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if "loss" in record:
            steps.append(record)
        elif "val_loss" in record:
            evals.append(record)
    key = lambda record: record.get("step", 0)  # noqa: E731
    return sorted(steps, key=key), sorted(evals, key=key)


def run_figures(path: str | Path) -> dict[str, Any]:
    """The run's figures from its metrics.jsonl.

    Returns:
        {"steps": last logged step, "tokens": tokens trained on, "wall_seconds": training and
        evaluation time, "tokens_per_s": tokens / wall_seconds, "train_loss": the last logged
        step's loss, "best_val_loss" and "best_val_step": the lowest validation loss and its
        step (None without validation)}. Counts are 0 and losses None for an empty file.
    """
    steps, evals = read_metrics(path)
    last = steps[-1] if steps else {}
    wall = max([r.get("elapsed_s", 0.0) for r in steps + evals] or [0.0])
    tokens = int(last.get("tokens", 0))
    finite = [r for r in evals if math.isfinite(r["val_loss"])]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    return {"steps": int(last.get("step", 0)), "tokens": tokens, "wall_seconds": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "train_loss": last.get("loss"),
            "best_val_loss": best["val_loss"] if best else None, "best_val_step": best["step"] if best else None}


def plot_loss(path: str | Path, png: str | Path) -> Path | None:
    """Write the loss curve: train loss per logged step, validation loss at each evaluation.

    Args:
        path: The run's metrics.jsonl.
        png: Where the PNG goes (PLOT_SIZE at PLOT_DPI: 800 x 450 pixels), written atomically.

    Returns:
        `png`, or None when matplotlib is not installed (one note printed; it is the `plot`
        extra) or the file holds no train records.
    """
    steps, evals = read_metrics(path)
    if not steps:
        return None
    try:
        import matplotlib
    except ImportError:
        print("note: loss.png skipped: matplotlib is not installed (pip install 'lorakit[plot]')")
        return None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)  # no pyplot: nothing global, nothing to close
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per response token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI)
    png = Path(png)
    atomic_write(png, buffer.getvalue())
    return png


def format_summary(figures: dict[str, Any], adapter: str | Path, plot: str | Path | None) -> str:
    """The one-screen summary printed at the end of a run (`figures` from `run_figures`)."""
    wall = figures["wall_seconds"]
    minutes, seconds = divmod(wall, 60)
    clock = f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    train_loss = figures["train_loss"]
    lines = [
        "training done",
        f"  steps            {figures['steps']}",
        f"  tokens           {figures['tokens']:,}",
        f"  wall time        {clock} ({figures['tokens_per_s']:,.0f} tokens/s)",
        f"  final train loss {train_loss:.4f}" if train_loss is not None else "  final train loss -",
    ]
    if figures["best_val_loss"] is not None:
        lines.append(f"  best val loss    {figures['best_val_loss']:.4f} (step {figures['best_val_step']})")
    else:
        lines.append("  best val loss    - (no validation examples)")
    lines.append(f"  adapter          {adapter}")
    if plot is not None:
        lines.append(f"  loss curve       {plot}")
    return "\n".join(lines)
