"""Inference benchmark: a forward pass with the adapter merged, and unmerged, against the bare base.

Usage: python -m benchmarks.inference [--quick] [--rounds N] [--threads N] [--clock cpu|wall]

One forward of the benchmark batch (input ids, B x T) under torch.inference_mode, for: the
base model alone; lorakit with an r=16 all-linear adapter merged into the weights (the
wrappers stay in place); the same adapter unmerged in lorakit and in PEFT. All variants are
interleaved in one process (see `common.interleave`).
"""

from __future__ import annotations

import argparse

import torch

from . import common
from .common import ModelSpec, Row

MODULE = "benchmarks.inference"
MERGED_GOAL, UNMERGED_GOAL = 1.02, 1.10
RANK = 16


def variants(spec: ModelSpec) -> dict:
    """name -> a callable running one forward."""
    import peft

    import lorakit

    ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=torch.Generator().manual_seed(2))
    base = common.build_llama(spec).eval()
    merged = lorakit.get_peft_model(common.build_llama(spec), lorakit.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)).eval()
    merged.merge_adapter()
    unmerged = lorakit.get_peft_model(common.build_llama(spec), lorakit.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)).eval()
    peft_model = peft.get_peft_model(common.build_llama(spec), peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)).eval()

    def forward(model):
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=ids)
        return run

    return {"base": forward(base), "merged": forward(merged), "unmerged": forward(unmerged),
            "peft-unmerged": forward(peft_model)}


def run(quick: bool, rounds: int, warmup: int, threads: int = 1, clock: str = "cpu",
        log=print) -> tuple[list[Row], dict]:
    """The two inference rows and the raw seconds per round."""
    spec = common.spec_for(quick)
    log(f"[inference] {rounds} rounds after {warmup} warm-up ...")
    times = common.interleave(variants(spec), rounds, warmup, clock)
    command = f"python -m {MODULE}" + (" --quick" if quick else "") + (
        f" --threads {threads}" if threads != 1 else "") + (f" --clock {clock}" if clock != "cpu" else "")
    base = common.seconds(common.median(times["base"]))
    merged = common.paired_ratio(times["merged"], times["base"])
    unmerged = common.paired_ratio(times["unmerged"], times["base"])
    rows = [
        Row(f"inference, r={RANK} all-linear merged, vs base", common.seconds(common.median(times["merged"])), base,
            "", merged, None, f"<= {MERGED_GOAL} base", merged <= MERGED_GOAL, command),
        Row(f"inference, r={RANK} all-linear unmerged, vs base", common.seconds(common.median(times["unmerged"])), base,
            common.seconds(common.median(times["peft-unmerged"])), unmerged,
            common.paired_ratio(times["unmerged"], times["peft-unmerged"]), f"<= {UNMERGED_GOAL} base",
            unmerged <= UNMERGED_GOAL, command),
    ]
    return rows, {"seconds": times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds")
    common.add_timing_args(parser, rounds=(10, 5), warmup=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, _ = run(args.quick, args.rounds or (5 if args.quick else 10), args.warmup, args.threads, args.clock)
    print(common.format_table(rows))


if __name__ == "__main__":
    main()
