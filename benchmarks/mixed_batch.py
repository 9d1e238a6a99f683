"""Mixed-adapter batch benchmark: one forward whose rows use different adapters, lorakit against PEFT.

Usage: python -m benchmarks.mixed_batch [--quick] [--adapters N ...] [--rounds N] [--threads N]
                                        [--clock cpu|wall] [--write-docs]

The issue's case: a Llama-style model (4 layers, hidden 512, MLP 1376, vocab 8192, random
weights), every linear layer of the decoder targeted with r=8 (lora_alpha 16, B != 0), a batch
of 64 rows x 32 tokens whose rows take the adapters round-robin (row i: adapter i mod N), one
forward under `torch.inference_mode`. For N = 1, 4, 16 and 64 adapters, interleaved in one
process, order balanced over rounds (`common.interleave`):

    base             the model without adapters
    lorakit          lorakit, `adapter_names=` (the stacked path of `layers.stacked`)
    lorakit-grouped  lorakit on its reference path (`autograd.set_lora_path("plain")`: the
                     grouped loop over adapters that runs what the stack cannot express)
    peft             PEFT, `adapter_names=`

Reported per N: medians (process CPU time by default), paired medians over rounds of
lorakit / base and PEFT / base, and the overhead ratio (lorakit / base - 1) / (PEFT / base - 1):
lorakit's LoRA overhead as a fraction of PEFT's. Goals: at 64 adapters the overhead ratio <= 0.25
and lorakit <= 1.10x base; at 1 adapter lorakit no slower than PEFT. With `--repeat N` (whole
runs, each building its models afresh) a last table gives, per adapter count, the median of the
N runs' ratios with their range, and judges the goals on those medians. `--write-docs` puts the
tables into docs/benchmarks.md in their own section (the rest of the file is left alone).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common
from .common import ModelSpec

MODULE = "benchmarks.mixed_batch"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION_START, SECTION_END = "<!-- benchmarks.mixed_batch: start -->", "<!-- benchmarks.mixed_batch: end -->"
SPEC = ModelSpec(layers=4, hidden=512, intermediate=1376, heads=8, vocab=8192, batch=64, seq=32)
QUICK = ModelSpec(layers=2, hidden=256, intermediate=688, heads=4, vocab=4096, batch=16, seq=16)
ADAPTERS = (1, 4, 16, 64)
RANK = 8
OVERHEAD_GOAL, FORWARD_GOAL = 0.25, 1.10  # at the most adapters
VARIANTS = ("base", "lorakit", "lorakit-grouped", "peft")


def build(library: str, spec: ModelSpec, n_adapters: int) -> torch.nn.Module:
    """`library` ("lorakit" or "peft") with `n_adapters` random r=8 all-linear adapters a0, a1, ..."""
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from lorakit import LoraConfig, get_peft_model
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(common.build_llama(spec), config, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", config)
    return model.eval()


def time_adapters(spec: ModelSpec, n_adapters: int, rounds: int, warmup: int,
                  clock: str = "cpu") -> dict[str, list[float]]:
    """Seconds per forward of each variant with `n_adapters` adapters, interleaved in one process."""
    from lorakit.layers import autograd

    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=torch.Generator().manual_seed(2))
    names = [f"a{i % n_adapters}" for i in range(spec.batch)]
    base = common.build_llama(spec).eval()
    ours, theirs = build("lorakit", spec, n_adapters), build("peft", spec, n_adapters)

    def forward(model, **kwargs):
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=ids, **kwargs)
        return run

    def grouped() -> None:
        with autograd.lora_path("plain"):
            forward(ours, adapter_names=names)()

    variants = {"base": forward(base), "lorakit": forward(ours, adapter_names=names), "lorakit-grouped": grouped,
                "peft": forward(theirs, adapter_names=names)}
    return common.interleave(variants, rounds, warmup, clock)


@dataclass
class Result:
    """One adapter count's medians (seconds) and paired ratios."""

    n_adapters: int
    medians: dict[str, float]
    lorakit: float  # lorakit / base
    grouped: float  # lorakit's grouped path / base
    peft: float  # PEFT / base

    @property
    def overhead(self) -> float:
        """lorakit's LoRA overhead over the base as a fraction of PEFT's."""
        return (self.lorakit - 1) / (self.peft - 1)

    def goals(self, most: int) -> list[tuple[str, bool]]:
        """(goal in words, met) for this row (see `goals`)."""
        return goals(self.n_adapters, self.lorakit, self.peft, self.overhead, most)


def goals(n_adapters: int, lorakit: float, peft: float, overhead: float, most: int) -> list[tuple[str, bool]]:
    """(goal in words, met): the 64-adapter goals on the largest count `most`, the 1-adapter one on 1."""
    met = []
    if n_adapters == most:
        met += [(f"overhead <= {OVERHEAD_GOAL} PEFT's", overhead <= OVERHEAD_GOAL),
                (f"<= {FORWARD_GOAL}x base", lorakit <= FORWARD_GOAL)]
    if n_adapters == 1:
        met.append(("no slower than PEFT", lorakit <= peft))
    return met


def across_runs(runs: list[list[Result]]) -> str:
    """A markdown table over whole runs: per adapter count, the median (and range) of each run's
    ratios, and the goals judged on the medians."""
    counts = [r.n_adapters for r in runs[0]]
    most = max(counts)
    header = ["adapters", "lorakit / base", "PEFT / base", "overhead vs PEFT's", "goals (on the medians)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, n in enumerate(counts):
        rows = [run[i] for run in runs]
        cells = [str(n)]
        for values, fmt in (([r.lorakit for r in rows], "{:.3f}x"), ([r.peft for r in rows], "{:.3f}x"),
                            ([r.overhead for r in rows], "{:.3f}")):
            cells.append(f"{fmt.format(common.median(values))} "
                         f"({fmt.format(min(values))} to {fmt.format(max(values))})")
        medians = [common.median([getattr(r, k) for r in rows]) for k in ("lorakit", "peft", "overhead")]
        judged = []
        for goal, met in goals(n, *medians, most):
            met_in = sum(dict(r.goals(most))[goal] for r in rows)
            judged.append(f"{goal}: {'met' if met else 'NOT met'} (in {met_in} of {len(rows)} runs)")
        cells.append("; ".join(judged))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(n_adapters: int, times: dict[str, list[float]]) -> Result:
    ratio = common.paired_ratio
    return Result(n_adapters, {v: common.median(times[v]) for v in VARIANTS},
                  lorakit=ratio(times["lorakit"], times["base"]),
                  grouped=ratio(times["lorakit-grouped"], times["base"]),
                  peft=ratio(times["peft"], times["base"]))


def format_table(results: list[Result]) -> str:
    """A markdown table: one row per adapter count."""
    most = max(r.n_adapters for r in results)
    header = ["adapters", "base", "lorakit", "PEFT", "lorakit / base", "PEFT / base",
              "overhead vs PEFT's", "lorakit grouped path / base", "goals"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for res in results:
        m = res.medians
        judged = "; ".join(f"{goal}: {'met' if met else 'NOT met'}" for goal, met in res.goals(most))
        cells = [str(res.n_adapters), common.seconds(m["base"]), common.seconds(m["lorakit"]),
                 common.seconds(m["peft"]), f"{res.lorakit:.3f}x", f"{res.peft:.3f}x", f"{res.overhead:.3f}",
                 f"{res.grouped:.3f}x", judged]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(tables: list[str], spec: ModelSpec, rounds: int, warmup: int, clock: str, command: str,
            summary: str | None = None) -> str:
    """The docs/benchmarks.md section, between its markers: one table per run, then the medians
    over runs (`across_runs`) where there were several."""
    machine = common.machine()
    runs = [f"Run {i} of {len(tables)}:\n\n{table}" for i, table in enumerate(tables, start=1)]
    if summary is not None:
        runs.append(f"Medians over the {len(tables)} runs (range over runs), the goals judged on the medians:"
                    f"\n\n{summary}")
    return "\n".join([
        SECTION_START,
        "## Mixed-adapter batches (`python -m benchmarks.mixed_batch`)",
        "",
        f"Generated by `{command}`; {machine['cpu']}, {machine['cores']} cores (shared with other jobs), "
        f"torch {machine['torch']}, peft {machine['peft']}, lorakit {machine['lorakit commit']}, "
        f"{machine['torch threads']} torch thread(s).",
        "",
        f"- Model: {spec.describe()}; float32, random weights; every decoder linear layer targeted, r={RANK}, "
        f"lora_alpha={2 * RANK}, B != 0; row i runs adapter i mod N.",
        "- One forward under `torch.inference_mode` with `adapter_names=`; base, lorakit (stacked path), "
        "lorakit's grouped reference path and PEFT interleaved in one process, order balanced over rounds, "
        f"{rounds} measured rounds after {warmup} warm-up; times are medians of "
        + ("process CPU time" if clock == "cpu" else "wall time")
        + ", ratios medians of per-round ratios; overhead vs PEFT's = (lorakit / base - 1) / (PEFT / base - 1).",
        "",
        "\n\n".join(runs),
        SECTION_END,
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds")
    parser.add_argument("--adapters", type=int, nargs="*",
                        help=f"adapter counts (default {' '.join(map(str, ADAPTERS))})")
    parser.add_argument("--repeat", type=int, default=1, help="whole runs, one table each (the spread)")
    common.add_timing_args(parser, rounds=(16, 4), warmup=1)  # 16: 4 whole cycles of the 4-variant design
    parser.add_argument("--write-docs", action="store_true", help="put the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.adapters is not None and any(n < 1 for n in args.adapters):
        parser.error("--adapters: every count must be at least 1")
    torch.set_num_threads(args.threads)
    spec = QUICK if args.quick else SPEC
    counts = args.adapters or list(ADAPTERS)
    rounds = args.rounds or (4 if args.quick else 16)
    tables, runs = [], []
    for run in range(args.repeat):
        results = []
        for n in counts:
            print(f"[mixed_batch] run {run + 1}, {n} adapters: {rounds} rounds after {args.warmup} warm-up ...",
                  flush=True)
            results.append(summarize(n, time_adapters(spec, n, rounds, args.warmup, args.clock)))
        runs.append(results)
        tables.append(format_table(results))
        print(tables[-1], flush=True)
    summary = across_runs(runs) if args.repeat > 1 else None
    if summary is not None:
        print(f"Medians over the {args.repeat} runs (range):", summary, sep="\n", flush=True)
    if args.write_docs:
        command = f"python -m {MODULE}" + (" --quick" if args.quick else "") + (
            f" --adapters {' '.join(map(str, counts))}" if args.adapters else "") + (
            f" --repeat {args.repeat}" if args.repeat != 1 else "") + (
            f" --rounds {rounds}" if args.rounds else "") + (
            f" --threads {args.threads}" if args.threads != 1 else "") + (
            f" --clock {args.clock}" if args.clock != "cpu" else "")
        common.write_section(DOCS, SECTION_START, SECTION_END,
                             section(tables, spec, rounds, args.warmup, args.clock, command, summary))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
