"""Check `lorakit.memory`'s estimate against the measured peak memory of real training steps.

Usage: .venv/bin/python benchmarks/memory_calibration.py [--quick] [--json results.json]

Each case builds a small Llama-style model from a config (random weights, no download), trains
it on this CPU in fp32 with fused AdamW (full fine-tuning, or LoRA r=8 through lorakit, with
lorakit's LoRA Function or with plain autograd as PEFT runs it, or QLoRA on lorakit's NF4
layers), and measures the peak memory of the step. Four model sizes, with and without gradient
checkpointing: 26 runs, about 8 minutes on 2 shared cores (--quick: the smallest size only, 8
runs, about 2 minutes).

Every case runs in its own fresh Python process:

- glibc is told to serve every allocation of 64 KiB or more with mmap
  (MALLOC_MMAP_THRESHOLD_=65536), so a freed tensor is returned to the OS at once and the
  resident set tracks the live tensors instead of the allocator's high-water mark;
- the process first runs one step of the same kind on a tiny model (kernels, thread pools and
  lazy imports get loaded), then records its resident set (VmRSS) as the baseline and resets
  the kernel's peak counter (writing 5 to /proc/self/clear_refs);
- it builds the real model, runs one step on 8 tokens (AdamW allocates its state), then one
  step on the real batch (which starts with the optimizer state allocated, as every later step
  does), and reads the peak resident set (VmHWM).

measured = VmHWM - baseline: everything the run added (weights, gradients, optimizer states,
activations, logits, and whatever the kernels and the allocator really use): the number a user
sees. retained = VmRSS after the step - baseline - the bytes of the parameters and optimizer
states: memory the CPU kernel libraries and the allocator keep after the first full-size step
(buffers, caches, fragmentation), which the estimate does not model (on a GPU the CUDA context
and the caching allocator's slack play that part).

The estimate is `lorakit.memory.estimate(...)`'s total for the same config and options. The
script prints the table with memory.py's constants, then fits the two calibrated constants
(LOGITS_BYTES_PER_VALUE, BACKWARD_WORKSPACE_FACTOR) by least squares on measured - retained
and prints the table again with the fitted values, so a change in PyTorch, transformers or
lorakit shows up here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

# Model sizes (Llama-style, GQA), trained in fp32.
SIZES = {
    "S": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8000),
    "M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=16000),
    "L": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
              num_key_value_heads=4, vocab_size=32000),
    # small vocabulary, wide MLP: the logits no longer dominate and the backward scratch shows
    "V": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256),
}
LORA_R = 8
QV = ["q_proj", "v_proj"]
ALL_LINEAR = "all-linear"


@dataclass
class Case:
    size: str
    batch: int
    seq: int
    mode: str  # "full", "lora" or "qlora" (lorakit's NF4 base, double quantization)
    targets: list[str] | str | None = None
    checkpointing: bool = False
    lora_path: str = "function"  # lorakit's LoRA path (LORAKIT_LORA_PATH): "function" or "plain"
    attention: str = "sdpa"

    @property
    def name(self) -> str:
        what = "full" if self.mode == "full" else f"{self.mode}-{'all' if self.targets == ALL_LINEAR else 'qv'}"
        if self.mode != "full" and self.lora_path == "plain":
            what += " plain"
        extras = (" +ckpt" if self.checkpointing else "") + (" eager" if self.attention == "eager" else "")
        return f"{self.size} b{self.batch}x{self.seq} {what}{extras}"


def cases(quick: bool) -> list[Case]:
    """Each size and length with: full FT and LoRA q,v, each with and without checkpointing;
    LoRA on all linears with lorakit's LoRA Function and with plain autograd (PEFT's way);
    QLoRA q,v. Plus one eager-attention run and a small-vocabulary model (backward scratch)."""
    import inspect

    import lorakit

    has_qlora = "quantize" in inspect.signature(lorakit.get_peft_model).parameters
    grid = [("S", 2, 1024), ("M", 1, 1536), ("L", 1, 512)]
    if quick:
        grid = grid[:1]
    out = []
    for size, batch, seq in grid:
        out += [Case(size, batch, seq, "full"), Case(size, batch, seq, "full", checkpointing=True),
                Case(size, batch, seq, "lora", QV), Case(size, batch, seq, "lora", QV, checkpointing=True),
                Case(size, batch, seq, "lora", ALL_LINEAR),
                Case(size, batch, seq, "lora", ALL_LINEAR, lora_path="plain")]
        if has_qlora:  # lorakit's NF4 base (get_peft_model(..., quantize="nf4"))
            out.append(Case(size, batch, seq, "qlora", QV))
    out.append(Case("S", 2, 1024, "full", attention="eager"))
    if not quick:
        out += [Case("V", 2, 1024, "full"), Case("V", 2, 1024, "full", checkpointing=True),
                Case("V", 2, 1024, "lora", QV), Case("V", 2, 1024, "lora", QV, checkpointing=True)]
    return out


# --- one measurement (child process) ----------------------------------------------------------

def _status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _llama_config(size: dict, attention: str = "sdpa"):
    from transformers import LlamaConfig

    return LlamaConfig(**size, max_position_embeddings=4096, use_cache=False, attn_implementation=attention)


def _train(case: Case, size: dict):
    """Build the case's model and run its two steps; returns (model, optimizer)."""
    import torch
    from transformers import LlamaForCausalLM

    import lorakit

    model = LlamaForCausalLM(_llama_config(size, case.attention)).train()
    if case.checkpointing:
        model.gradient_checkpointing_enable()  # transformers' default: use_reentrant=False
    if case.mode != "full":
        quantize = dict(quantize="nf4", double_quant=True) if case.mode == "qlora" else {}
        model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=LORA_R, target_modules=case.targets), **quantize)
        model.train()
    # fused: transformers' default (adamw_torch_fused); its step allocates no temporaries
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    short = torch.randint(0, size["vocab_size"], (1, 8), generator=generator)
    batch = torch.randint(0, size["vocab_size"], (case.batch, case.seq), generator=generator)
    for ids in (short, batch):
        loss = model(input_ids=ids, labels=ids).loss  # keep only the loss, as transformers' Trainer does
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return model, optimizer


def measure(case: Case) -> dict:
    """Run in the child: warm up, reset the peak counter, train; peak and retained over baseline."""
    import gc

    import torch

    from lorakit.memory import lorakit_lora_inputs

    torch.manual_seed(0)
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256)
    _train(Case("tiny", 1, 32, case.mode, case.targets, case.checkpointing, case.lora_path, case.attention), tiny)
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    model, optimizer = _train(case, SIZES[case.size])
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - baseline
    gc.collect()
    held = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()) + sum(
        t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return {"measured": peak, "retained": _status("VmRSS") - baseline - held, "seconds": seconds,
            "lora_inputs": lorakit_lora_inputs()}


def run_child(case: Case) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               LORAKIT_LORA_PATH=case.lora_path)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case.__dict__)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- estimate and fit (parent) -------------------------------------------------------------------

def estimate_parts(case: Case, lora_inputs: str) -> dict:
    """The estimate's pieces for a case, with the two calibrated terms kept apart."""
    from lorakit import memory

    config = _llama_config(SIZES[case.size], case.attention)
    est = memory.estimate(config, r=LORA_R, target_modules=case.targets if case.mode == "lora" else None,
                          dtype="fp32", optimizer="adamw", batch_size=case.batch, seq_len=case.seq,
                          gradient_checkpointing=case.checkpointing, attention=case.attention, lora_inputs=lora_inputs)
    b = est.breakdowns[case.mode]  # double_quant=True: the default
    shape = memory.Shape.from_config(config)
    tokens = case.batch * case.seq
    workspace_unit = 4 * tokens * shape.intermediate  # bytes per unit of BACKWARD_WORKSPACE_FACTOR
    return {"weights": b.weights, "optimizer": b.optimizer, "gradients": b.gradients, "kept": b.activations,
            "recomputed": b.scratch - memory.BACKWARD_WORKSPACE_FACTOR * workspace_unit,
            "workspace_unit": workspace_unit, "logits_unit": tokens * shape.vocab}


def total(parts: dict, logits_per_value: float, workspace_factor: float) -> float:
    """memory.Breakdown.total with the two constants given."""
    scratch = parts["recomputed"] + workspace_factor * parts["workspace_unit"]
    logits = logits_per_value * parts["logits_unit"]
    return parts["weights"] + parts["optimizer"] + max(parts["gradients"], parts["kept"] + max(logits, scratch))


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least-squares fit of (logits bytes per value, workspace factor) on the relative error
    against measured - retained. Grid search: the model is piecewise linear (the max)."""
    best = None
    for logits_per_value in [x / 4 for x in range(32, 81)]:  # 8 .. 20 B per logit
        for workspace in [x / 4 for x in range(0, 33)]:  # 0 .. 8
            err = sum(((total(r["parts"], logits_per_value, workspace) - r["tensors"]) / r["tensors"]) ** 2
                      for r in rows)
            if best is None or err < best[0]:
                best = (err, logits_per_value, workspace)
    return best[1], best[2]


def table(rows: list[dict], logits_per_value: float, workspace: float, title: str) -> str:
    lines = [title, f"{'case':28s}{'measured':>10s}{'retained':>10s}{'estimate':>10s}{'error':>9s}"
                    f"{'error excl. retained':>22s}", f"{'':28s}{'MiB':>10s}{'MiB':>10s}{'MiB':>10s}"]
    errors, errors_tensors = [], []
    for r in rows:
        est = total(r["parts"], logits_per_value, workspace)
        error = 100 * (est - r["measured"]) / r["measured"]
        error_tensors = 100 * (est - r["tensors"]) / r["tensors"]
        errors.append(abs(error))
        errors_tensors.append(abs(error_tensors))
        lines.append(f"{r['case']:28s}{r['measured'] / 2**20:10.0f}{r['retained'] / 2**20:10.0f}{est / 2**20:10.0f}"
                     f"{error:+8.1f}%{error_tensors:+21.1f}%")
    lines.append(f"mean |error| {sum(errors) / len(errors):.1f}% (max {max(errors):.1f}%); excluding retained "
                 f"{sum(errors_tensors) / len(errors_tensors):.1f}% (max {max(errors_tensors):.1f}%)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smallest size only (eight runs; the backward-scratch constant needs the full run)")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Case(**json.loads(args.child)))))
        return 0

    from lorakit import memory

    rows = []
    start = time.perf_counter()
    for case in cases(args.quick):
        result = run_child(case)
        rows.append({"case": case.name, **result, "tensors": result["measured"] - result["retained"],
                     "parts": estimate_parts(case, result["lora_inputs"])})
        print(f"  {case.name:28s} {result['measured'] / 2**20:8.0f} MiB  ({result['seconds']:.1f} s)", flush=True)
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s\n")
    print(table(rows, memory.LOGITS_BYTES_PER_VALUE, memory.BACKWARD_WORKSPACE_FACTOR,
                f"with memory.py's constants (logits {memory.LOGITS_BYTES_PER_VALUE:g} B/value, "
                f"backward scratch {memory.BACKWARD_WORKSPACE_FACTOR:g} x T·f·d)"))
    logits_per_value, workspace = fit(rows)
    print()
    print(table(rows, logits_per_value, workspace,
                f"fitted on measured - retained (logits {logits_per_value:g} B/value, "
                f"backward scratch {workspace:g} x T·f·d)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "fitted": {"logits_bytes_per_value": logits_per_value,
                                                "backward_workspace_factor": workspace}}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
