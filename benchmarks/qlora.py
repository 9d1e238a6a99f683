"""QLoRA vs bf16 LoRA vs full fine-tuning: base weight memory, peak training memory, step time.

Usage: python -m benchmarks.qlora [--quick] [--random] [--rounds N] [--batch B] [--seq T]
                                  [--checkpointing] [--no-memory] [--threads N] [--clock cpu|wall]
       python -m benchmarks.qlora --child VARIANT ...   (one memory measurement, JSON on the last line)

The model is the embedded SmolLM2-135M-Instruct (`lorakit.hub.load_model_and_tokenizer()`, in
bf16), or with `--random` (or when the hub cannot load it) a random LlamaForCausalLM of the same
shape: hidden 576, 30 layers, 9 heads, 3 key/value heads, MLP 1536, vocab 49152, tied
embeddings. `--quick` uses 4 layers of that shape, random.

Variants, all on the same batch of random token ids (labels = inputs):

    qlora      every Linear but the head in NF4 (`get_peft_model(..., quantize="nf4")`), bf16
               compute; LoRA r=16, alpha 32, dropout 0.05 on all linear layers; AdamW
    lora-bf16  the bf16 model with the same LoRA; AdamW
    full-bf16  every parameter of the bf16 model trained; AdamW (bf16 states)

A step is forward, loss, backward, optimizer step and zero_grad.

Base weight memory: bytes of the base model's tensors (parameters and buffers, each storage
once, the tied embedding once, adapters excluded), exact; plus the resident-set growth of a
fresh process while it builds the model and reads every weight once (the QLoRA child loads
the 4-bit base with `load_quantized`: no bf16 copy is ever resident). Peak training memory: each variant in its own
subprocess (`benchmarks.common.child_peak`): VmHWM over one measured step after a warm-up step,
minus the resident set before the model was built. Step time: the variants in one process, one
step each per round in orders balanced over rounds, median per variant and the median of the per-round
QLoRA / bf16-LoRA ratio (`benchmarks.common.interleave`); by default the process's CPU time with
one torch thread, which other processes on a shared machine disturb least.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import common

MODULE = "benchmarks.qlora"
VARIANTS = ("qlora", "lora-bf16", "full-bf16")
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=100000.0)
GOAL_BASE_RATIO = 0.32
GOAL_STEP_RATIO = 1.5


@dataclass(frozen=True)
class Setup:
    """What every variant shares.

    Args:
        random: A random SmolLM2-shaped model instead of the embedded weights.
        layers: Decoder layers of the random model (30: SmolLM2's).
        batch: Rows per batch.
        seq: Tokens per row.
        checkpointing: Activation checkpointing (non-reentrant) in every variant.
    """

    random: bool = False
    layers: int = 30
    batch: int = 2
    seq: int = 128
    checkpointing: bool = False

    def args(self) -> list[str]:
        return (["--random"] * self.random + ["--layers", str(self.layers), "--batch", str(self.batch),
                "--seq", str(self.seq)] + ["--checkpointing"] * self.checkpointing)

    def describe(self) -> str:
        model = (f"random SmolLM2-135M-shaped Llama ({self.layers} layers)" if self.random
                 else "SmolLM2-135M-Instruct (embedded)")
        return (f"{model}, bf16; batch {self.batch} x {self.seq} tokens; LoRA r=16 all-linear; "
                f"checkpointing {'on' if self.checkpointing else 'off'}")


# --- building the variants ----------------------------------------------------------------------

def load_bf16(setup: Setup) -> nn.Module:
    """The bf16 base model, in train mode, frozen."""
    if not setup.random:
        from lorakit.hub import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(dtype=torch.bfloat16)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2 | {"num_hidden_layers": setup.layers}))).to(torch.bfloat16)
    model.requires_grad_(False)
    return model.train()


def lora_config():
    from lorakit import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def build(variant: str, setup: Setup, quantized_dir: str | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(model, optimizer) of a variant, in train mode.

    The QLoRA base comes from `quantized_dir` (written by `save_quantized`) when given, else it is
    the bf16 model quantized here.
    """
    from lorakit import get_peft_model

    if variant == "qlora":
        if quantized_dir:
            from lorakit.quant import load_quantized

            model = get_peft_model(load_quantized(quantized_dir), lora_config())
        else:
            model = get_peft_model(load_bf16(setup), lora_config(), quantize="nf4")
    elif variant == "lora-bf16":
        model = get_peft_model(load_bf16(setup), lora_config())
    elif variant == "full-bf16":
        model = load_bf16(setup).requires_grad_(True)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    model.train()
    if setup.checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def batch(setup: Setup, vocab: int) -> torch.Tensor:
    """Token ids (batch, seq), the same for every variant."""
    return torch.randint(0, vocab, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(1))


def step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- measuring ----------------------------------------------------------------------------------

def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base model's tensors, each storage once, adapters excluded.

    Returns:
        {"total": all base tensors, "quantized": the 4-bit layers' tensors,
         "quantized_as_bf16": what those layers weigh in bf16 (weight and bias)}.
    """
    from lorakit.quant import Linear4bit

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, total = set(), 0
    for name, tensor in [*inner.named_parameters(remove_duplicate=False), *inner.named_buffers()]:
        if ".lora_" in name:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    quantized = as_bf16 = 0
    for module in inner.modules():
        if isinstance(module, Linear4bit):
            quantized += sum(t.numel() * t.element_size() for t in [*module.buffers(), *module.parameters()])
            as_bf16 += 2 * (module.quantized_numel + (module.out_features if module.bias is not None else 0))
    return {"total": total, "quantized": quantized, "quantized_as_bf16": as_bf16}


def child_memory(variant: str, setup: Setup, quantized_dir: str | None) -> dict:
    """Resident growth while building `variant` and its peak over one training step (in this process)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports and kernels before the baseline)

    import lorakit.quant  # noqa: F401

    if not setup.random:
        import lorakit.hub  # noqa: F401
    probe = torch.ones(8, 8, dtype=torch.bfloat16, requires_grad=True)
    (probe @ probe).sum().backward()
    start = common.rss_bytes()
    model, optimizer = build(variant, setup, quantized_dir)
    with torch.no_grad():  # fault in every page (load_quantized maps the file lazily)
        for tensor in model.state_dict().values():
            tensor.sum()
    resident = common.rss_bytes() - start
    weights = base_weight_bytes(model)["total"]
    step = step_fn(model, optimizer, batch(setup, model.config.vocab_size))
    step()  # gradients and optimizer states now exist
    try:
        common.reset_peak()
        measured_from = "step"
    except OSError:
        measured_from = "process start"
    step()
    return {"variant": variant, "resident": resident, "weights": weights,
            "peak": common.peak_bytes() - start, "peak_measured_over": measured_from}


def time_steps(setup: Setup, quantized_dir: str, rounds: int, warmup: int, clock: str) -> dict[str, list[float]]:
    """Seconds per step of every variant, interleaved in this process."""
    steps = {}
    for variant in VARIANTS:
        model, optimizer = build(variant, setup, quantized_dir)
        steps[variant] = step_fn(model, optimizer, batch(setup, model.config.vocab_size))
    return common.interleave(steps, rounds=rounds, warmup=warmup, clock=clock)


def prepare(setup: Setup, directory: str) -> dict:
    """Quantize the model once (plain NF4 into `directory`, and with double quant for its size)."""
    from lorakit.quant import quantize_for_lora, save_quantized

    sizes = {}
    bf16 = load_bf16(setup)
    sizes["bf16"] = base_weight_bytes(bf16)
    for name, double_quant in (("nf4", False), ("nf4-dq", True)):
        model = load_bf16(setup)
        started = time.perf_counter()
        quantize_for_lora(model, lora_config(), double_quant=double_quant)
        sizes[name] = base_weight_bytes(model) | {"quantize_seconds": time.perf_counter() - started}
        if name == "nf4":
            save_quantized(model, directory, overwrite=True)
        del model
    return sizes


# --- report -------------------------------------------------------------------------------------

def report(setup: Setup, sizes: dict, memory: dict[str, dict], times: dict[str, list[float]], command: str) -> str:
    bf16 = sizes["bf16"]["total"]
    lines = [f"Setup: {setup.describe()}.", f"Command: `{command}`", ""]
    lines += ["| variant | base weights | vs bf16 | resident after load | peak training (RSS) | step time | vs bf16 LoRA |",
              "|---|---|---|---|---|---|---|"]
    lora_times = times.get("lora-bf16")
    for variant in VARIANTS:
        weights = sizes["nf4"]["total"] if variant == "qlora" else bf16
        mem = memory.get(variant, {})
        step = times.get(variant)
        ratio = common.paired_ratio(step, lora_times) if step and lora_times else None
        lines.append("| " + " | ".join([
            variant, common.mib(weights), f"{weights / bf16:.3f}x",
            common.mib(mem["resident"]) if mem else "-", common.mib(mem["peak"]) if mem else "-",
            f"{common.median(step):.2f} s" if step else "-", f"{ratio:.2f}x" if ratio else "-"]) + " |")
    dq = sizes["nf4-dq"]["total"]
    lines.append(f"| qlora, double quant (size only) | {common.mib(dq)} | {dq / bf16:.3f}x | | | | |")
    nf4 = sizes["nf4"]
    lines += ["", f"4-bit layers alone: {common.mib(nf4['quantized'])} vs {common.mib(nf4['quantized_as_bf16'])} "
              f"in bf16 = {nf4['quantized'] / nf4['quantized_as_bf16']:.3f}x "
              f"({sizes['nf4-dq']['quantized'] / nf4['quantized_as_bf16']:.3f}x with double quant); "
              f"the rest of the base (embedding tied to the head, norms) stays bf16: "
              f"{common.mib(nf4['total'] - nf4['quantized'])}.",
              f"Quantizing the model took {nf4['quantize_seconds']:.1f} s (wall)."]
    base_ratio = nf4["total"] / bf16
    lines.append(f"Goal base weights <= {GOAL_BASE_RATIO}x bf16: {base_ratio:.3f}x, "
                 f"{'met' if base_ratio <= GOAL_BASE_RATIO else 'NOT met'}.")
    if "qlora" in times and lora_times:
        step_ratio = common.paired_ratio(times["qlora"], lora_times)
        lines.append(f"Goal QLoRA step <= {GOAL_STEP_RATIO}x bf16 LoRA step: {step_ratio:.2f}x, "
                     f"{'met' if step_ratio <= GOAL_STEP_RATIO else 'NOT met'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 random layers, 2 rounds: a smoke run")
    parser.add_argument("--random", action="store_true", help="random SmolLM2-shaped weights, not the embedded ones")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the random model (default 30)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every variant")
    common.add_timing_args(parser, rounds=(4, 2), warmup=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--quantized-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    random = args.random or args.quick
    if not random:
        try:
            import lorakit.hub  # noqa: F401
        except ImportError:
            print("lorakit.hub is not available: using a random SmolLM2-shaped model")
            random = True
    setup = Setup(random=random, layers=args.layers or (4 if args.quick else 30), batch=args.batch, seq=args.seq,
                  checkpointing=args.checkpointing)
    if args.child:
        print(json.dumps(child_memory(args.child, setup, args.quantized_dir)))
        return
    rounds = args.rounds or (2 if args.quick else 4)
    command = " ".join(["python -m benchmarks.qlora", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        quantized_dir = f"{tmp}/base-nf4"
        sizes = prepare(setup, quantized_dir)
        memory = {}
        if not args.no_memory:
            for variant in VARIANTS:
                memory[variant] = common.child_peak(MODULE, ["--child", variant, "--quantized-dir", quantized_dir,
                                                             "--threads", str(args.threads), *setup.args()])
        times = time_steps(setup, quantized_dir, rounds, args.warmup, args.clock)
    print(report(setup, sizes, memory, times, command))
    print(json.dumps({"setup": setup.__dict__, "sizes": sizes, "memory": memory, "seconds": times,
                      "machine": common.machine()}))


if __name__ == "__main__":
    main()
