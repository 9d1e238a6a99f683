"""What every benchmark row shares: the model, interleaved timing, and peak memory of a process.

The model is a Llama-style decoder built from a config (no download), the same for every
variant of a row, with the same seed and the same batch.

Timing: the variants of a row run in one process, one step of each per round, in the orders
of a Williams design (every variant right after every other one equally often), after warm-up
rounds; a row reports each variant's median and, for a
ratio, the median over rounds of the per-round ratio (paired, so a slow round for the machine
slows both sides of the ratio).

Memory: each variant runs in a fresh subprocess (`child_peak`) with glibc told to serve every
allocation of 64 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_=65536), so freed tensors leave
the resident set at once and the resident set tracks live memory. The child reads VmRSS before
building anything, runs one warm-up step (so gradients and optimizer states exist), resets the
kernel's high-water mark (/proc/self/clear_refs), runs the measured step and reads VmHWM. The
reported peak is VmHWM minus that first VmRSS: weights, adapter states, activations and
temporaries, without the interpreter and libraries.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

MMAP_THRESHOLD = 65536


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style model and the batch it is benchmarked on.

    Args:
        layers: Decoder layers.
        hidden: Hidden size.
        intermediate: MLP width.
        heads: Attention heads (as many key/value heads: no grouping).
        vocab: Vocabulary size.
        batch: Rows per batch.
        seq: Tokens per row.
    """

    layers: int = 12
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    vocab: int = 8192
    batch: int = 4
    seq: int = 256

    def describe(self) -> str:
        return (f"Llama-style, {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
                f"{self.heads} heads, vocab {self.vocab}; batch {self.batch} x {self.seq} tokens")


FULL = ModelSpec()
QUICK = ModelSpec(layers=4, hidden=256, intermediate=688, heads=4, vocab=4096, batch=2, seq=128)


def spec_for(quick: bool) -> ModelSpec:
    return QUICK if quick else FULL


def build_llama(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The benchmark model, frozen, in train mode (dropout and checkpointing active), eager attention kernels (sdpa)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads, vocab_size=spec.vocab,
                         max_position_embeddings=max(spec.seq, 512), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    return model.train()


def make_batch(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict[str, torch.Tensor]:
    """inputs_embeds (B, T, hidden), requiring grad so a frozen model still runs its backward; labels (B, T)."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(spec.batch, spec.seq, spec.hidden, generator=generator).to(dtype)
    labels = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=generator)
    return {"inputs_embeds": embeds.requires_grad_(), "labels": labels}


# --- timing -----------------------------------------------------------------------------------

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def balanced_orders(n: int) -> list[list[int]]:
    """The rows of a Williams design for n variants (n rows, 2n for odd n): each row an order
    of 0..n-1; over the rows every variant comes first equally often and right after every
    other variant equally often."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(v + k) % n for v in first] for k in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def interleave(variants: dict[str, Callable[[], None]], rounds: int, warmup: int,
               clock: str = "cpu", untimed: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of each per round, the orders those of a
    Williams design (`balanced_orders`): over its rounds every variant runs right after every
    other one equally often (exactly so where `rounds` is a multiple of its length: n variants,
    2n for odd n). Plain rotation keeps each variant right after the same one, so what that one
    leaves behind in caches and the allocator always lands on the same variant.

    Args:
        variants: name -> a callable doing one step.
        rounds: Measured rounds.
        warmup: Unmeasured rounds first.
        clock: "cpu" (the process's CPU time: with one torch thread on a shared machine, the
            time the step itself ran, not the time other processes held the cores) or "wall".
        untimed: name -> a callable run after each call of that variant, outside the timing.

    Returns:
        name -> `rounds` durations, round i of every variant measured in the same round.
    """
    now = CLOCKS[clock]
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    orders = [[names[k] for k in order] for order in balanced_orders(len(names))]
    for i in range(warmup + rounds):
        for name in orders[(i - warmup) % len(orders)]:  # the measured rounds start the design
            start = now()
            variants[name]()
            elapsed = now() - start
            if untimed and name in untimed:
                untimed[name]()
            if i >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


# --- memory -----------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """The process's resident set now."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    """Reset the kernel's resident-set high-water mark to the current resident set.

    Raises:
        OSError: /proc/self/clear_refs cannot be written (then peaks are not measurable here).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    """The resident-set high-water mark since the last `reset_peak`."""
    return _status_kib("VmHWM") * 1024


def child_peak(module: str, args: list[str], timeout: float = 600) -> dict:
    """Run `python -m module args...` in a fresh process (mmap threshold fixed) and return the
    JSON object it prints on its last line of output.

    Raises:
        RuntimeError: the child failed; its stderr is in the message.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- the machine ------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    """CPU, cores, memory and library versions, for the report."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        mem = "?"
    import peft
    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip() or "?"
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True, cwd=here).stdout.strip():
            commit += " + uncommitted changes"
    except OSError:
        commit = "?"
    return {
        "cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "os": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "lorakit commit": commit, "torch threads": str(torch.get_num_threads()),
    }


# --- the table --------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table.

    Args:
        name: What is measured, e.g. "step time, r=16 all-linear, dropout 0.05".
        lorakit: lorakit's value, formatted.
        reference: The floor or the base model's value, formatted ("" when none).
        peft: PEFT's value, formatted ("" when none).
        vs_reference: lorakit / reference (None when none).
        vs_peft: lorakit / PEFT, or a speed-up where the goal says so (None when none).
        goal: The goal in words ("" when the row has none).
        met: Whether the goal is met (None when the row has none).
        command: The command that measures this row alone.
    """

    name: str
    lorakit: str
    reference: str = ""
    peft: str = ""
    vs_reference: float | None = None
    vs_peft: float | None = None
    goal: str = ""
    met: bool | None = None
    command: str = ""


def format_table(rows: list[Row]) -> str:
    """A markdown table of `rows` (also readable as plain text)."""
    header = ["row", "lorakit", "floor / base", "PEFT", "vs floor / base", "vs PEFT", "goal", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        met = "" if row.met is None else ("met" if row.met else "NOT met")
        cells = [row.name, row.lorakit, row.reference, row.peft,
                 "" if row.vs_reference is None else f"{row.vs_reference:.3f}x",
                 "" if row.vs_peft is None else f"{row.vs_peft:.3f}x", row.goal, met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path, start: str, end: str, text: str) -> None:
    """Put `text` (a section from marker line `start` to `end`) into the file `path` (a Path):
    replace the previous one, or append it; the rest of the file is left as it is.

    Raises:
        ValueError: the file's markers do not enclose exactly one section (a start without its
            end, or two sections), which a replacement could not mend without losing text.
    """
    import re

    from lorakit.files import atomic_write

    old = path.read_text() if path.exists() else ""
    if old.count(start) > 1 or old.count(start) != old.count(end):
        raise ValueError(f"{path}: the markers {start!r} and {end!r} must enclose one section "
                         f"(found {old.count(start)} and {old.count(end)}); mend the file by hand")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if start in old and not pattern.search(old):
        raise ValueError(f"{path}: {end!r} comes before {start!r}; mend the file by hand")
    new = pattern.sub(lambda _: text, old, count=1) if start in old else old.rstrip("\n") + "\n\n" + text + "\n"
    atomic_write(path, new.encode())


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def seconds(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 10 else f"{t:.1f} s"


def add_timing_args(parser, rounds: tuple[int, int], warmup: int = 1) -> None:
    """The flags every timed benchmark takes: --rounds (default rounds[0], rounds[1] with --quick),
    --warmup, --threads and --clock."""
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"measured rounds (default {rounds[0]}, quick {rounds[1]})")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: process CPU time (default); wall: elapsed time")
