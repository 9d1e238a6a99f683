"""Adapter-load benchmark: a ~50 MB adapter loaded onto a running model, lorakit against PEFT.

Usage: python -m benchmarks.adapter_load [--quick] [--rounds N] [--threads N] [--clock cpu|wall]

The adapter (r chosen so its float32 weights are about 50 MB on the full model, all-linear,
random weights) is written once in PEFT's format by lorakit. Each round loads it under a new
name onto a model already holding a small "default" adapter (r=8 q,v) and deletes it again:
lorakit's `PeftModel.load_adapter`, PEFT's `load_adapter` as called by default, and PEFT's
with `low_cpu_mem_usage=True` (its fast path, for reference). Timed: the load_adapter call
(reading the file from the page cache, creating the layers, copying the weights).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from . import common
from .common import ModelSpec, Row

MODULE = "benchmarks.adapter_load"
SPEED_UP_GOAL = 5.0
TARGET_BYTES = 50e6


def adapter_rank(spec: ModelSpec) -> int:
    """The all-linear rank whose float32 factors take about 50 MB on the full model."""
    per_rank = spec.layers * (4 * 2 * spec.hidden + 3 * (spec.hidden + spec.intermediate))  # sum of (in + out)
    return max(1, round(TARGET_BYTES / (4 * per_rank)))


def variants(spec: ModelSpec, folder: str) -> tuple[dict, dict, int]:
    """name -> a callable loading the adapter, name -> one deleting it again, and the file's size."""
    import peft

    import lorakit

    source = lorakit.get_peft_model(common.build_llama(spec), lorakit.LoraConfig(
        r=adapter_rank(common.FULL), lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    source.save_pretrained(folder)
    size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    del source
    running = lorakit.get_peft_model(common.build_llama(spec).eval(),
                                     lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_running = peft.get_peft_model(common.build_llama(spec).eval(),
                                       peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

    def load(model, **kwargs):
        def run() -> None:
            model.load_adapter(folder, adapter_name="loaded", **kwargs)
        return run

    def delete(model):
        return lambda: model.delete_adapter("loaded")

    loads = {"lorakit": load(running), "peft": load(peft_running),
             "peft-low-cpu-mem": load(peft_running, low_cpu_mem_usage=True)}
    deletes = {"lorakit": delete(running), "peft": delete(peft_running), "peft-low-cpu-mem": delete(peft_running)}
    return loads, deletes, size


def run(quick: bool, rounds: int, warmup: int, threads: int = 1, clock: str = "cpu",
        log=print) -> tuple[list[Row], dict]:
    """The adapter-load row and the raw seconds per round (the load alone; each is deleted
    again outside the timing)."""
    spec = common.spec_for(quick)
    with tempfile.TemporaryDirectory() as folder:
        loads, deletes, size = variants(spec, folder)
        log(f"[adapter_load] {size / 1e6:.1f} MB adapter, {rounds} rounds after {warmup} warm-up ...")
        times = common.interleave(loads, rounds, warmup, clock, untimed=deletes)
    command = f"python -m {MODULE}" + (" --quick" if quick else "") + (
        f" --threads {threads}" if threads != 1 else "") + (f" --clock {clock}" if clock != "cpu" else "")
    vs_peft = common.paired_ratio(times["lorakit"], times["peft"])
    low = common.median(times["peft-low-cpu-mem"])
    row = Row(f"load a {size / 1e6:.0f} MB adapter onto a running model (PEFT low_cpu_mem_usage=True: "
              f"{common.seconds(low)})", common.seconds(common.median(times["lorakit"])), "",
              common.seconds(common.median(times["peft"])), None, vs_peft,
              f"<= {1 / SPEED_UP_GOAL:.2f} PEFT ({SPEED_UP_GOAL:.0f}x faster)", vs_peft <= 1 / SPEED_UP_GOAL, command)
    return [row], {"seconds": times, "bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds")
    common.add_timing_args(parser, rounds=(7, 3), warmup=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, _ = run(args.quick, args.rounds or (3 if args.quick else 7), args.warmup, args.threads, args.clock)
    print(common.format_table(rows))


if __name__ == "__main__":
    main()
