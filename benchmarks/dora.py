"""DoRA training-step benchmark: DoRA against LoRA, in lorakit and in PEFT, on one model and batch.

Usage: python -m benchmarks.dora [--quick] [--config NAME ...] [--rounds N] [--threads N]
                                 [--clock cpu|wall] [--write-docs]

A step is forward, loss and backward (gradients of the adapter and of inputs_embeds), as in
`benchmarks.lora_step`, on the same Llama-style model (`common.ModelSpec`). Variants timed per
round, interleaved in one process with the order balanced over rounds (`common.interleave`):

    lorakit-lora   lorakit, use_dora=False (its default training path)
    lorakit-dora   lorakit, use_dora=True (the DoRA Function of `lorakit.layers.dora`)
    lorakit-plain  the same DoRA model on lorakit's plain autograd path (the reference)
    peft-lora      PEFT, use_dora=False
    peft-dora      PEFT, use_dora=True

Reported per configuration: each variant's median step time and the paired medians (over
rounds) of DoRA / LoRA for each library and of lorakit's DoRA / PEFT's DoRA. `--write-docs`
puts the table into docs/benchmarks.md, in its own section (replaced on each run; the rest of
the file is left alone).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common
from .common import ModelSpec
from .lora_step import make_step

MODULE = "benchmarks.dora"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION_START, SECTION_END = "<!-- benchmarks.dora: start -->", "<!-- benchmarks.dora: end -->"
VARIANTS = ("lorakit-lora", "lorakit-dora", "lorakit-plain", "peft-lora", "peft-dora")


@dataclass(frozen=True)
class DoraConfig:
    """One training configuration.

    Args:
        name: Short name, used on the command line.
        title: Words for the table.
        r: Rank (lora_alpha = 2r).
        targets: target_modules.
        dropout: lora_dropout. With dropout, DoRA (PEFT's formula, the paper's code) also runs the
            base product on the dropped input: one more base-sized product forward and backward.
    """

    name: str
    title: str
    r: int
    targets: tuple[str, ...] | str
    dropout: float


CONFIGS = [
    DoraConfig("r16-all", "r=16 all-linear", 16, "all-linear", 0.0),
    DoraConfig("r16-all-dropout", "r=16 all-linear, dropout 0.05", 16, "all-linear", 0.05),
]
BY_NAME = {c.name: c for c in CONFIGS}


def build(library: str, use_dora: bool, spec: ModelSpec, config: DoraConfig) -> torch.nn.Module:
    """The model of one variant: `library` "peft" or "lorakit", DoRA on or off, in train mode."""
    model = common.build_llama(spec)
    targets = list(config.targets) if isinstance(config.targets, tuple) else config.targets
    kwargs = dict(r=config.r, lora_alpha=2 * config.r, target_modules=targets, lora_dropout=config.dropout,
                  use_dora=use_dora)
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from lorakit import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(**kwargs)).train()
    with torch.no_grad():  # a trained-looking adapter: B != 0, m != ||W||
        generator = torch.Generator().manual_seed(0)
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


def time_config(spec: ModelSpec, config: DoraConfig, rounds: int, warmup: int,
                clock: str = "cpu") -> dict[str, list[float]]:
    """Seconds per step of each variant, interleaved in one process."""
    batch = common.make_batch(spec)
    lorakit_dora = build("lorakit", True, spec, config)
    variants = {
        "lorakit-lora": make_step(build("lorakit", False, spec, config), batch),
        "lorakit-dora": make_step(lorakit_dora, batch),
        "lorakit-plain": make_step(lorakit_dora, batch, plain=True),
        "peft-lora": make_step(build("peft", False, spec, config), batch),
        "peft-dora": make_step(build("peft", True, spec, config), batch),
    }
    return common.interleave(variants, rounds, warmup, clock)


@dataclass
class Result:
    """One configuration's medians (seconds) and paired ratios."""

    config: DoraConfig
    medians: dict[str, float]
    lorakit_ratio: float  # lorakit DoRA / lorakit LoRA
    peft_ratio: float  # PEFT DoRA / PEFT LoRA
    plain_ratio: float  # lorakit DoRA on the plain path / lorakit LoRA
    vs_peft: float  # lorakit DoRA / PEFT DoRA


def summarize(config: DoraConfig, times: dict[str, list[float]]) -> Result:
    ratio = common.paired_ratio
    return Result(config, {v: common.median(times[v]) for v in VARIANTS},
                  lorakit_ratio=ratio(times["lorakit-dora"], times["lorakit-lora"]),
                  peft_ratio=ratio(times["peft-dora"], times["peft-lora"]),
                  plain_ratio=ratio(times["lorakit-plain"], times["lorakit-lora"]),
                  vs_peft=ratio(times["lorakit-dora"], times["peft-dora"]))


def format_table(results: list[Result]) -> str:
    """A markdown table: one row per configuration."""
    header = ["config", "lorakit LoRA", "lorakit DoRA", "lorakit DoRA / LoRA", "PEFT LoRA", "PEFT DoRA",
              "PEFT DoRA / LoRA", "lorakit DoRA / PEFT DoRA", "lorakit plain-path DoRA / LoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for res in results:
        m = res.medians
        cells = [res.config.title, common.seconds(m["lorakit-lora"]), common.seconds(m["lorakit-dora"]),
                 f"{res.lorakit_ratio:.3f}x", common.seconds(m["peft-lora"]), common.seconds(m["peft-dora"]),
                 f"{res.peft_ratio:.3f}x", f"{res.vs_peft:.3f}x", f"{res.plain_ratio:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(results: list[Result], spec: ModelSpec, rounds: int, command: str) -> str:
    """The docs/benchmarks.md section, between its markers."""
    machine = common.machine()
    return "\n".join([
        SECTION_START,
        "## DoRA training step (`python -m benchmarks.dora`)",
        "",
        f"Generated by `{command}`; {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"peft {machine['peft']}, lorakit {machine['lorakit commit']}, {machine['torch threads']} torch thread(s).",
        "",
        f"- Model: {spec.describe()}; float32, adapters float32, lora_alpha = 2r, trainable tensors "
        "perturbed (B != 0, m != ||W||).",
        "- A step is forward, loss and backward, as in the rows above; the five variants (lorakit "
        "LoRA, lorakit DoRA, lorakit DoRA on its plain autograd path, PEFT LoRA, PEFT DoRA) run "
        f"interleaved in one process, order balanced over rounds, {rounds} measured rounds after one "
        "warm-up; times are medians (process CPU time), ratios medians of per-round ratios.",
        "- With dropout, DoRA as PEFT and the paper's code define it rescales the base product of the "
        "*dropped* input, so every implementation pays one more base-sized product forward and "
        "backward; without dropout the base output is reused.",
        "",
        format_table(results),
        SECTION_END,
    ])


def write_docs(text: str, path: Path = DOCS) -> None:
    """Put `text` (a marked section) into `path`: replace the previous one, or append it."""
    common.write_section(path, SECTION_START, SECTION_END, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds")
    parser.add_argument("--config", nargs="*", choices=list(BY_NAME), help="configurations (default: all)")
    common.add_timing_args(parser, rounds=(5, 3), warmup=1)
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = common.spec_for(args.quick)
    configs = [BY_NAME[n] for n in args.config] if args.config else CONFIGS
    rounds = args.rounds or (3 if args.quick else 5)
    results = []
    for config in configs:
        print(f"[dora] {config.name}: timing {rounds} rounds after {args.warmup} warm-up ...", flush=True)
        results.append(summarize(config, time_config(spec, config, rounds, args.warmup, args.clock)))
    table = format_table(results)
    print(table)
    if args.write_docs:
        command = f"python -m {MODULE}" + (" --quick" if args.quick else "") + (
            f" --config {' '.join(c.name for c in configs)}" if args.config else "") + (
            f" --rounds {rounds}" if args.rounds else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
        write_docs(section(results, spec, rounds, command))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
