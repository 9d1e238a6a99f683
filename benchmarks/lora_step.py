"""Training-step benchmark: the floor, PEFT and lorakit on the same Llama-style model and batch.

Usage: python -m benchmarks.lora_step [--quick] [--config NAME ...] [--rounds N] [--no-memory]
       python -m benchmarks.lora_step --child-memory CONFIG VARIANT [--quick]   (one peak, as JSON)

A step is forward, loss and backward (gradients of the adapter and of inputs_embeds); the
optimizer is left out of the timed step (it is the same for PEFT and lorakit) but runs in the
memory children, so its states are resident at the measured peak.

The floor of a LoRA step is what no LoRA implementation can avoid:

    floor time   = one step of the frozen base (forward + backward, input gradients only) in
                   which the target layers also do the adapter's own products, from hooks
                   (`FloorHooks`): x A^T, h B^T accumulated into the output; g B, g^T h,
                   g_h^T x, and g_h A accumulated into the input's gradient
    floor memory = frozen base's peak + the adapter's parameters, gradients and AdamW states

Variants timed per round: base (frozen, no adapter), floor, peft, lorakit (the autograd
Function path, default) and lorakit-plain (lorakit's plain autograd path, the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass

import torch

from . import common
from .common import ModelSpec, Row

MODULE = "benchmarks.lora_step"


@dataclass(frozen=True)
class StepConfig:
    """One training configuration.

    Args:
        name: Short name, used on the command line.
        title: Words for the table.
        r: LoRA rank (lora_alpha = 2r).
        targets: target_modules.
        dropout: lora_dropout.
        checkpointing: Gradient checkpointing on (transformers' default, non-reentrant).
        dtype: The base model's dtype ("float32" or "bfloat16"); adapters stay float32.
        goals: The issue's goals apply to this configuration.
    """

    name: str
    title: str
    r: int
    targets: tuple[str, ...] | str
    dropout: float
    checkpointing: bool = False
    dtype: str = "float32"
    goals: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


CONFIGS = [
    StepConfig("r8-qv", "r=8 q,v", 8, ("q_proj", "v_proj"), 0.0),
    StepConfig("r16-all-dropout", "r=16 all-linear, dropout 0.05", 16, "all-linear", 0.05, goals=True),
    StepConfig("r16-all-dropout-gc", "r=16 all-linear, dropout 0.05, checkpointing", 16, "all-linear", 0.05,
               checkpointing=True),
    StepConfig("r16-all-dropout-bf16", "r=16 all-linear, dropout 0.05, bf16", 16, "all-linear", 0.05,
               dtype="bfloat16"),
]
BY_NAME = {c.name: c for c in CONFIGS}
STEP_TIME_GOAL_FLOOR, STEP_TIME_GOAL_PEFT = 1.08, 0.9
MEMORY_GOAL_FLOOR, MEMORY_GOAL_PEFT = 1.05, 0.75
ADAM_BYTES_PER_PARAM = 16  # float32 parameter, gradient, exp_avg, exp_avg_sq


# --- the variants -------------------------------------------------------------------------------

def build(variant: str, spec: ModelSpec, config: StepConfig) -> torch.nn.Module:
    """The model of one variant: "base" (frozen), "peft", or "lorakit" (also used by "lorakit-plain")."""
    model = common.build_llama(spec, config.torch_dtype)
    if config.checkpointing:
        model.activation_checkpointing_enable()
    targets = list(config.targets) if isinstance(config.targets, tuple) else config.targets
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=config.r, lora_alpha=2 * config.r, target_modules=targets,
                                                lora_dropout=config.dropout)).train()
    if variant in ("lorakit", "lorakit-plain"):
        from lorakit import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=config.r, lora_alpha=2 * config.r, target_modules=targets,
                                                lora_dropout=config.dropout)).train()
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model: torch.nn.Module, batch: dict, plain: bool = False, optimizer=None):
    """A callable doing one step: forward, loss, backward (and the optimizer when given), grads cleared."""
    from lorakit.layers import autograd

    params = trainable(model)

    def step() -> None:
        with autograd.lora_path("plain") if plain else contextlib.nullcontext():
            model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
        batch["inputs_embeds"].grad = None
        for p in params:
            p.grad = None

    return step


class FloorHooks:
    """The floor of a LoRA step: a frozen base model whose target layers do the adapter's
    products, and nothing else, from hooks.

    A forward hook adds alpha · (x A^T) B^T to each target's output in place; a full backward
    hook forms g_h = g B, dB = g^T h, dA = g_h^T x and adds g_h A into the input's gradient
    in place. The products run in float32 like the adapters (x cast for them under bf16), at
    their natural place in the step (so with the caches a real step has), without autograd
    nodes, dropout or anything else of their own. The hooks keep x for dA: this model's time
    is the floor's, its memory is not (the memory floor is computed, see the module docstring).

    Args:
        model: A frozen base model (hooks are added to it).
        config: Which layers are targets, and the rank.
    """

    def __init__(self, model: torch.nn.Module, config: StepConfig) -> None:
        from lorakit import LoraConfig
        from lorakit.targeting import select_targets

        targets = list(config.targets) if isinstance(config.targets, tuple) else config.targets
        generator = torch.Generator().manual_seed(0)
        for path in select_targets(model, LoraConfig(r=config.r, target_modules=targets)):
            layer = model.get_submodule(path)
            a = torch.randn(config.r, layer.in_features, generator=generator) * 0.01  # (r, in)
            b = torch.randn(layer.out_features, config.r, generator=generator) * 0.01  # (out, r)
            state: dict = {}
            layer.register_forward_hook(self._forward(a, b, state))
            layer.register_full_backward_hook(self._backward(a, b, state))

    @staticmethod
    def _forward(a: torch.Tensor, b: torch.Tensor, state: dict):
        def hook(module, inputs, output):
            with torch.no_grad():
                x = inputs[0].reshape(-1, a.shape[1]).to(a.dtype)  # (N, in)
                h = torch.mm(x, a.t())  # (N, r)
                out = output.view(-1, b.shape[0])  # (N, out)
                if out.dtype == h.dtype:
                    out.addmm_(h, b.t(), alpha=2.0)
                else:
                    out.add_(torch.mm(h, b.t()))
                state["x"], state["h"] = x, h

        return hook

    @staticmethod
    def _backward(a: torch.Tensor, b: torch.Tensor, state: dict):
        def hook(module, grad_input, grad_output):
            with torch.no_grad():
                g = grad_output[0].reshape(-1, b.shape[0]).to(a.dtype)  # (N, out)
                g_h = torch.mm(g, b)  # (N, r)
                torch.mm(g.t(), state["h"])  # dB: (out, r)
                torch.mm(g_h.t(), state["x"])  # dA: (r, in)
                dx = grad_input[0]
                if dx is None:
                    return None
                flat = dx.reshape(-1, a.shape[1])  # (N, in)
                if flat.dtype == a.dtype and flat.data_ptr() == dx.data_ptr():
                    flat.addmm_(g_h, a)  # dx += g_h A
                    return (dx,)
                return ((flat + torch.mm(g_h, a).to(flat.dtype)).view(dx.shape),)

        return hook


# --- timing and memory --------------------------------------------------------------------------

def time_config(spec: ModelSpec, config: StepConfig, rounds: int, warmup: int,
                clock: str = "cpu") -> dict[str, list[float]]:
    """Seconds per step of each variant, interleaved in one process (see `common.interleave`)."""
    batch = common.make_batch(spec, config.torch_dtype)
    base, floor, peft, lorakit = (build(v, spec, config) for v in ("base", "base", "peft", "lorakit"))
    FloorHooks(floor, config)
    variants = {
        "base": make_step(base, batch),
        "floor": make_step(floor, batch),
        "peft": make_step(peft, batch),
        "lorakit": make_step(lorakit, batch),
        "lorakit-plain": make_step(lorakit, batch, plain=True),
    }
    return common.interleave(variants, rounds, warmup, clock)


def child_memory(spec: ModelSpec, config: StepConfig, variant: str) -> dict:
    """In a fresh process: the peak resident memory of one step of `variant` (see `common`)."""
    import peft  # noqa: F401 - every variant's libraries are loaded before the baseline is read
    import transformers  # noqa: F401

    import lorakit  # noqa: F401

    batch = common.make_batch(spec, config.torch_dtype)
    start = common.rss_bytes()
    model = build(variant, spec, config)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    step = make_step(model, batch, plain=variant == "lorakit-plain", optimizer=optimizer)
    step()  # warm-up: gradients and optimizer states come to exist
    common.reset_peak()
    step()
    return {"peak": common.peak_bytes() - start, "adapter_params": sum(p.numel() for p in params)}


def memory_config(spec: ModelSpec, config: StepConfig, quick: bool, threads: int) -> dict[str, dict]:
    """Peak of base, PEFT and lorakit, each in its own subprocess."""
    flags = (["--quick"] if quick else []) + ["--threads", str(threads)]
    return {variant: common.child_peak(MODULE, ["--child-memory", config.name, variant, *flags])
            for variant in ("base", "peft", "lorakit")}


def rows_for(config: StepConfig, times: dict[str, list[float]], memory: dict[str, dict] | None,
             command: str) -> list[Row]:
    """The table rows of one configuration: step time, and peak memory when measured."""
    floor = times["floor"]
    t_lk, t_peft = common.median(times["lorakit"]), common.median(times["peft"])
    vs_floor = common.paired_ratio(times["lorakit"], floor)
    vs_peft = common.paired_ratio(times["lorakit"], times["peft"])
    plain = common.paired_ratio(times["lorakit-plain"], floor)
    peft_floor = common.paired_ratio(times["peft"], floor)
    goal = met = None
    if config.goals:
        goal = f"<= {STEP_TIME_GOAL_FLOOR} floor, <= {STEP_TIME_GOAL_PEFT} PEFT"
        met = vs_floor <= STEP_TIME_GOAL_FLOOR and vs_peft <= STEP_TIME_GOAL_PEFT
    base = common.paired_ratio(times["floor"], times["base"])
    rows = [Row(f"step time, {config.title} (floor {base:.3f}x base; plain path {plain:.3f}x floor; "
                f"PEFT {peft_floor:.3f}x floor)",
                common.seconds(t_lk), common.seconds(common.median(floor)), common.seconds(t_peft),
                vs_floor, vs_peft, goal or "", met, command)]
    if memory is not None:
        n = memory["lorakit"]["adapter_params"]
        floor_mem = memory["base"]["peak"] + ADAM_BYTES_PER_PARAM * n
        lk, pf = memory["lorakit"]["peak"], memory["peft"]["peak"]
        goal = met = None
        if config.goals:
            goal = f"<= {MEMORY_GOAL_FLOOR} floor, <= {MEMORY_GOAL_PEFT} PEFT"
            met = lk / floor_mem <= MEMORY_GOAL_FLOOR and lk / pf <= MEMORY_GOAL_PEFT
        rows.append(Row(f"peak memory, {config.title}", common.mib(lk), common.mib(floor_mem), common.mib(pf),
                        lk / floor_mem, lk / pf, goal or "", met, command))
    return rows


def run(configs: list[StepConfig], quick: bool, rounds: int, warmup: int, memory: bool, threads: int,
        clock: str = "cpu", log=print) -> tuple[list[Row], dict]:
    """Rows of every configuration, and the raw measurements (seconds per round, peak bytes)."""
    spec = common.spec_for(quick)
    rows, raw = [], {}
    for config in configs:
        log(f"[lora_step] {config.name}: timing {rounds} rounds after {warmup} warm-up ...")
        times = time_config(spec, config, rounds, warmup, clock)
        mem = None
        if memory:
            log(f"[lora_step] {config.name}: peak memory, one subprocess per variant ...")
            mem = memory_config(spec, config, quick, threads)
        command = f"python -m {MODULE} --config {config.name}" + (" --quick" if quick else "") + (
            f" --threads {threads}" if threads != 1 else "") + (f" --clock {clock}" if clock != "cpu" else "")
        rows.extend(rows_for(config, times, mem, command))
        raw[config.name] = {"seconds": times, "memory": mem}
    return rows, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rounds")
    parser.add_argument("--config", nargs="*", choices=list(BY_NAME), help="configurations (default: all)")
    common.add_timing_args(parser, rounds=(5, 3), warmup=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child-memory", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        config, variant = args.child_memory
        print(json.dumps(child_memory(common.spec_for(args.quick), BY_NAME[config], variant)))
        return
    configs = [BY_NAME[n] for n in args.config] if args.config else CONFIGS
    rounds = args.rounds or (3 if args.quick else 5)
    rows, _ = run(configs, args.quick, rounds, args.warmup, not args.no_memory, args.threads, args.clock)
    print(common.format_table(rows))


if __name__ == "__main__":
    main()
