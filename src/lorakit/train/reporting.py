"""Where a training run's metrics go: metrics.jsonl always, and `--report-to` one tracker.

    check_report_to("tensorboard")                 # before the model loads: ReportError if missing
    reporter = Reporter(out, "tensorboard", start=0, run_name="mine", config=recipe.to_flags())
    reporter.log({"step": 1, "loss": 2.3, "lr": 1e-3, "grad_norm": 0.8, "tokens_per_s": 900.0,
                  "peak_memory_mib": 512.0})
    reporter.log({"step": 1, "val_loss": 2.1})
    reporter.close()

Trackers: tensorboard (`torch.utils.tensorboard.SummaryWriter`, event files under
out/tensorboard/), wandb and mlflow (each only when installed; a missing one is a `ReportError`
saying what to install, raised before the model loads). Each record's numbers go to the tracker
under `SCALARS`' tags (train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/peak_memory_mib, eval/loss). Only rank 0 makes a Reporter under torchrun.

A resumed run drops the metrics.jsonl records of the steps it redoes (so each step is there
once), and its TensorBoard writer purges the events from the resumed step on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
# metrics.jsonl key -> the tracker's tag
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "peak_memory_mib": "train/peak_memory_mib",
           "val_loss": "eval/loss"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> import name


class ReportError(ValueError):
    """A `--report-to` tracker that is unknown or not installed."""


def check_report_to(name: str) -> None:
    """Refuse an unknown tracker or one whose package is missing (call before any work).

    Raises:
        ReportError: names the tracker and the `pip install` that brings it.
    """
    if name not in REPORT_TO:
        raise ReportError(f"unknown --report-to {name!r}: use {', '.join(REPORT_TO)}")
    if name != "none" and not _importable(_PACKAGES[name]):
        raise ReportError(f"--report-to {name} needs the {name} package, which is not installed: "
                          f"pip install {name}  (or pass --report-to none)")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken spec
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: torch.cuda.max_memory_allocated on CUDA, the process's peak
    resident set (ru_maxrss, KiB on Linux) elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Reporter:
    """metrics.jsonl plus the `report_to` tracker, for one run.

    Args:
        out_dir: The run directory (metrics.jsonl, tensorboard/).
        report_to: One of REPORT_TO.
        start: The step a resumed run continues from (0 for a new run): records after it are dropped.
        run_name: The tracker's run name (wandb, mlflow).
        config: The run's settings, given to wandb and mlflow as the run's config / params.

    Raises:
        ReportError: as `check_report_to`.
    """

    def __init__(self, out_dir: Path, report_to: str = "none", start: int = 0, run_name: str | None = None,
                 config: dict[str, Any] | None = None):
        check_report_to(report_to)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / "metrics.jsonl"
        self._jsonl = open_metrics(self.path, start)
        self._sink = _open_sink(report_to, Path(out_dir), start, run_name or Path(out_dir).name, config or {})

    def log(self, record: dict[str, Any]) -> None:
        """One record (a logged step, or an evaluation with "val_loss"): a metrics.jsonl line,
        and its finite numbers to the tracker at record["step"]."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._sink is not None:
            scalars = {SCALARS[key]: float(value) for key, value in record.items()
                       if key in SCALARS and value is not None and math.isfinite(float(value))}
            self._sink.log(scalars, int(record["step"]))

    def close(self) -> None:
        self._jsonl.close()
        if self._sink is not None:
            self._sink.close()


def open_metrics(path: Path, start: int):
    """metrics.jsonl for appending, holding only the records of steps up to `start` (those a
    resumed run does not redo; none for a new run), so that each step is there once."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and _record_step(line) <= start]
        atomic_write(path, "".join(kept).encode())
    return open(path, "a")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a line cut short by a kill: dropped
        return 1 << 62


# --- trackers: log(scalars, step), close() ------------------------------------------------------

def _open_sink(name: str, out_dir: Path, start: int, run_name: str, config: dict[str, Any]):
    if name == "tensorboard":
        return _TensorBoard(out_dir / "tensorboard", start)
    if name == "wandb":
        return _Wandb(out_dir, run_name, config)
    if name == "mlflow":
        return _Mlflow(run_name, config)
    return None


class _TensorBoard:
    def __init__(self, log_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events from the resumed step on (written before a kill, or by an earlier run into
        # this folder when start is 0) are dropped, as metrics.jsonl drops them
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(name=run_name, dir=str(out_dir), config=_plain(config))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_name: str, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({key: str(value) for key, value in config.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The settings as JSON-able values (sets and tuples as lists, other objects as text)."""
    return json.loads(json.dumps(config, default=lambda value: list(value) if isinstance(value, (set, tuple))
                                 else str(value)))
