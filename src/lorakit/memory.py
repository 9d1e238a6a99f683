"""Training-memory estimate for a causal LM: full fine-tuning, LoRA and QLoRA side by side.

Usage: lorakit memory MODEL [--r 8] [--target-modules q_proj,v_proj] [--dtype bf16]
       [--optimizer adamw] [--batch-size 1] [--seq-len 2048] [--gradient-checkpointing]
       [--no-double-quant] [--attention sdpa] [--lora-inputs auto] [--json]
       [--world-size 8 --strategy ddp|fsdp]

MODEL is a preset (`lorakit.presets`: Llama-2-7B, Mistral-7B, Llama-3-8B, Qwen2.5-7B,
SmolLM2-135M), a local model folder, or its `config.json`. Nothing is downloaded and no weight
is allocated: the model is built on the `meta` device, so parameter counts are exact, and the
LoRA count is `lorakit.get_peft_model(...).print_trainable_parameters()`'s own line.

Convention ("pure dtype": `model.to(dtype)` and a plain training step, as transformers'
Trainer runs it):
- the base model's weights and gradients, and the activations, are held in `dtype`; there is
  no fp32 master copy (for the AMP set-up, fp32 weights with 16-bit compute, pass fp32);
- LoRA factors, their gradients and their optimizer state are fp32, as lorakit and PEFT create
  the factors;
- AdamW keeps two fp32 moments (8 B per trainable parameter) and its step adds no temporary
  (fused AdamW, transformers' default `adamw_torch_fused`); 8-bit AdamW (bitsandbytes) keeps
  two 1-byte moments plus an fp32 absmax per 256 values (tensors under 4096 values stay
  32-bit); SGD without momentum keeps nothing;
- QLoRA stores every Linear except the output head in NF4 (blocks of 64 with an fp32 absmax:
  4.5 bits per parameter; with double quantization the absmax are 8-bit in blocks of 256 with
  an fp32 scale: ~4.127 bits); embeddings, norms and the head stay in `dtype`;
- gradients are set to None between steps (`zero_grad()`'s default) and the step keeps only
  the loss, not the logits.

The peak is then
    total = weights + optimizer + max(gradients, activations + max(logits, backward scratch))
gradients fill in while backward frees the activations; the logits' buffers are gone before
the first decoder layer runs backward, which is when the scratch (that layer's gradients, and
with checkpointing its recomputed activations) is live.

Several processes (`--world-size N`, each with its own micro-batch of `--batch-size`), per rank:
- ddp: every rank holds the whole model, gradients and optimizer states, plus DDP's gradient
  buckets (a second copy of the trainable parameters' gradients, which are all-reduced from them);
- fsdp (FSDP2, per decoder layer and the root, as `train.distributed.shard`): the weights (the
  frozen base, a 4-bit base's packed storage included, and the LoRA factors), gradients and
  optimizer states are split across ranks, 1/N each, plus what is gathered whole while the first
  decoder layer runs backward: the root's own parameters (embeddings, final norm, head: the root
  stays gathered from its forward to the end of backward) and the largest decoder layer's,
  with their not yet reduce-scattered gradients;
- activations, logits and scratch are those of one rank's micro-batch, as in one process.
    total = weights + optimizer + buckets + gathered + max(gradients, activations + max(logits, scratch))

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models": s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit), redone tensor by tensor
for the Llama block (RMSNorm, GQA attention through SDPA/flash, SwiGLU MLP, no dropout): see
`layer_activation_bytes`. Frozen layers still keep what their *input* gradient needs (norm
inputs, SiLU and product inputs, attention's q/k/v/output); a trained Linear also keeps its
input for its weight gradient. The formulas were checked tensor by tensor against autograd's
saved tensors, and the peaks against real training runs by `benchmarks/memory_calibration.py`
(docs/memory.md has the table).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from .quant import QUANTIZERS, nf4_bits_per_param

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FACTOR_BYTES = 4  # LoRA factors are fp32 whatever the base dtype (lorakit, PEFT)
GB, GIB = 1e9, 2**30


# bitsandbytes' 8-bit optimizers: blockwise with 256 values per fp32 absmax; tensors with
# fewer than 4096 values keep fp32 states.
ADAM8BIT_BLOCKSIZE = 256
ADAM8BIT_MIN_NUMEL = 4096

# Calibrated by benchmarks/memory_calibration.py: 26 real training steps of Llama-style models
# (4 sizes; full FT, LoRA, QLoRA; with and without checkpointing) on CPU in fp32, peak resident
# memory per run. A least-squares fit gives 11.75 B/value and 2.75 against the analytic 12 and 3
# kept here; with these the estimate is within 1.0% on average (max 5.6%) of the measured peak
# less the runtime libraries' own buffers (4.0%, max 7.3%, below the raw peak). docs/memory.md.
# Logits: bytes per value of the (tokens, vocab) logits live during the loss's backward: the
# fp32 log-softmax output, its gradient and the logits' fp32 gradient (3 x 4 B).
LOGITS_BYTES_PER_VALUE = 12.0
# Scratch while the first decoder layer runs backward (the gradients of its intermediates), in
# units of tokens x intermediate_size x dtype bytes.
BACKWARD_WORKSPACE_FACTOR = 3.0

Mode = Literal["full", "lora", "qlora"]
MODES: tuple[Mode, ...] = ("full", "lora", "qlora")
MODE_TITLES = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}
ROWS = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
        "activations": "activations", "logits": "logits", "scratch": "backward scratch", "total": "total"}
# rows shown only with several processes
DISTRIBUTED_ROWS = {"base": "  of which base", "buckets": "DDP grad buckets", "gathered": "FSDP gathered"}
STRATEGIES = ("ddp", "fsdp")

# Linear layers of a Llama-style block, grouped by the tensor they read.
QKV = frozenset({"q_proj", "k_proj", "v_proj"})
GATE_UP = frozenset({"gate_proj", "up_proj"})
BLOCK_LINEARS = QKV | GATE_UP | {"o_proj", "down_proj"}


# --- the model: config, shapes, parameter counts ----------------------------------------------

def load_model_config(model: str):
    """A `transformers` config from a preset name, a model folder or a `config.json` path.

    Raises:
        ValueError: `model` is none of those, or its config.json cannot be read.
    """
    from transformers import AutoConfig

    from .presets import PRESETS, find_preset, preset_config

    if find_preset(model):
        return preset_config(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"MODEL {model!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor a model folder nor a config.json file")
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        config = AutoConfig.for_model(model_type, **data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    except KeyError as err:
        raise ValueError(f"{path} has no 'model_type'") from err
    except ValueError as err:  # unknown model_type
        raise ValueError(f"{path}: {err}") from err
    config.name_or_path = str(path.parent)
    return config


@dataclass(frozen=True)
class Shape:
    """The sizes the activation formula needs (Llama names)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Shape:
        """Read the sizes from a `transformers` config (text part for multimodal configs)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        heads = text.num_attention_heads
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        return cls(layers=text.num_hidden_layers, hidden=hidden, intermediate=intermediate, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size)


@dataclass
class ParamCounts:
    """Parameter counts of the base model and of the LoRA adapter, from a meta-device build.

    `trainable_line` is what `print_trainable_parameters()` prints for the LoRA model.
    """

    total: int
    lora: int
    trainable_line: str
    targets: list[str]  # leaf names of the adapted modules, e.g. ["q_proj", "v_proj"]
    base_tensors: list[int] = field(repr=False)  # numel of every base parameter
    lora_tensors: list[int] = field(repr=False)  # numel of every LoRA factor
    quantized_tensors: list[int] = field(repr=False)  # numel of every Linear weight QLoRA stores in NF4
    llama_style: bool = True  # blocks have q/k/v/o and gate/up/down projections
    units: list[Unit] = field(default_factory=list, repr=False)  # FSDP's: the root's own, then each decoder layer

    @property
    def quantized(self) -> int:
        return sum(self.quantized_tensors)


@dataclass(frozen=True)
class Unit:
    """The parameters FSDP gathers together: one decoder layer, or the root's own (those in no layer).

    base: numel of its frozen base parameters; quantized: numel of each of its Linear weights
    QLoRA stores in NF4 (part of `base`); lora: numel of its LoRA factors.
    """

    base: int
    quantized: tuple[int, ...]
    lora: int


def _units(peft_model, base_model, head: str | None) -> list[Unit]:
    """[root's own, each decoder layer] (empty when the model names no decoder layer class)."""
    import torch

    names = set(getattr(base_model, "_no_split_modules", None) or [])
    layers = [(path, m) for path, m in base_model.named_modules() if type(m).__name__ in names]
    if not layers:
        return []
    prefixes = tuple(path + "." for path, _ in layers)

    def unit(params: list, linears: list) -> Unit:
        return Unit(base=sum(p.numel() for _, p in params if not p.requires_grad),
                    quantized=tuple(m.weight.numel() for _, m in linears),
                    lora=sum(p.numel() for _, p in params if p.requires_grad))

    params = list(base_model.named_parameters())
    linears = [(path, m) for path, m in base_model.named_modules()
               if isinstance(m, torch.nn.Linear) and path != head and not _is_lora_factor(path)]
    root = unit([(n, p) for n, p in params if not n.startswith(prefixes)],
                [(n, m) for n, m in linears if not n.startswith(prefixes)])
    return [root] + [unit([(n, p) for n, p in params if n.startswith(path + ".")],
                          [(n, m) for n, m in linears if n.startswith(path + ".")]) for path, _ in layers]


def _is_lora_factor(path: str) -> bool:
    """A LoRA factor module's path (`....lora_A.default`), not a base Linear's."""
    return ".lora_" in path


def count_parameters(config, r: int = 8, target_modules: list[str] | str | None = None) -> ParamCounts:
    """Build the model on the meta device, wrap it with LoRA, and count.

    Args:
        config: A `transformers` config of a causal LM.
        r: LoRA rank. Default 8.
        target_modules: As `LoraConfig.target_modules` (None: the architecture's default).

    Returns:
        The counts; no memory is allocated for weights.

    Raises:
        ValueError: the config is not a causal LM transformers can build, or the targets
            match nothing (`TargetError`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .config import LoraConfig
    from .peft_model import get_peft_model
    from .targeting import output_head_path

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ValueError(f"cannot build a causal LM from this config: {err}") from err
    head = output_head_path(model)
    base_tensors = [p.numel() for p in model.parameters()]
    quantized = [m.weight.numel() for path, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and path != head]
    leaf_names = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=target_modules))
    lora_tensors = [p.numel() for p in peft_model.parameters() if p.requires_grad]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        peft_model.print_trainable_parameters()
    targets = sorted({path.rsplit(".", 1)[-1] for path, _ in peft_model.lora_layers()})
    units = _units(peft_model, peft_model.get_base_model(), head)
    return ParamCounts(total=sum(base_tensors), lora=sum(lora_tensors), trainable_line=buffer.getvalue().strip(),
                       targets=targets, base_tensors=base_tensors, lora_tensors=lora_tensors,
                       quantized_tensors=quantized, llama_style=BLOCK_LINEARS <= leaf_names, units=units)


# --- storage per component --------------------------------------------------------------------

def nf4_bytes(numel: int, double_quant: bool = True) -> float:
    """Bytes of one weight stored in NF4 (codes plus block scales): what the "nf4" format's own
    `weight_bytes` says, i.e. `lorakit.quant.quantize_nf4(w, double_quant=...).nbytes` (tested).

    Args:
        numel: Number of weights.
        double_quant: Scales stored in 8 bits (blocks of 256, one fp32 scale each). Default True.
    """
    return QUANTIZERS["nf4"].weight_bytes(numel, double_quant)


def optimizer_bytes(tensors: list[int], optimizer: str) -> float:
    """Optimizer state for parameters of the given sizes.

    Args:
        tensors: numel of each trainable parameter.
        optimizer: "adamw" (two fp32 moments), "adamw8bit" (bitsandbytes, two 8-bit moments
            and one fp32 absmax per 256 values; tensors under 4096 values stay fp32) or "sgd".

    Returns:
        Bytes.
    """
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw":
        return 8 * sum(tensors)
    if optimizer == "adamw8bit":
        return sum(8 * n if n < ADAM8BIT_MIN_NUMEL else 2 * n + 2 * 4 * math.ceil(n / ADAM8BIT_BLOCKSIZE)
                   for n in tensors)
    raise ValueError(f"optimizer must be adamw, adamw8bit or sgd, got {optimizer!r}")


def lorakit_lora_inputs() -> str:
    """How lorakit's LoRA layers keep their input for dL/dA: "rebuilt" or "saved".

    "rebuilt": lorakit's LoRA autograd Function rebuilds the input in backward from tensors the
    frozen block keeps anyway (RMSNorm's input and 1/rms, SiLU(gate) and up), so an adapter
    saves only A·x. "saved": plain autograd (PEFT, or LORAKIT_LORA_PATH=plain) keeps the input.
    """
    try:
        from .layers import autograd
    except ImportError:
        return "saved"
    path = getattr(autograd, "get_lora_path", lambda: "plain")()
    return "rebuilt" if path == "function" and getattr(autograd, "RECOMPUTE_INPUTS", False) else "saved"


def layer_activation_bytes(shape: Shape, tokens: int, seq_len: int, dtype_bytes: int, adapted: frozenset[str],
                           full: bool, lora_r: int = 0, lora_inputs: str = "saved", attention: str = "sdpa") -> int:
    """Bytes one Llama decoder layer keeps for backward, tensor by tensor.

    T = tokens (batch x sequence), s = sequence, d = dtype bytes, h = hidden, f = intermediate,
    a = heads, q = heads·head_dim, kv = kv_heads·head_dim.

    What the block keeps even when frozen (for the input gradient):
    - each of the two RMSNorms: its input in fp32 (a copy when d = 2) 4·T·h, and 1/rms 4·T;
    - attention, SDPA (flash / memory-efficient): rotated q d·T·q, rotated k and v 2·d·T·kv,
      output d·T·q (also o_proj's input), log-sum-exp 4·T·a. Eager: q, k and v repeated to all
      heads 3·d·T·q, probabilities 4·T·a·s (+ d·T·a·s, the cast back, when d = 2);
    - SwiGLU: gate, SiLU(gate) and up outputs 3·d·T·f.
    Full fine-tuning adds the inputs of everything with a weight: each norm's normalised input
    d·T·h, the q/k/v input d·T·h, the gate/up input d·T·h, down_proj's input d·T·f (eager
    attention also o_proj's input d·T·q).
    LoRA adds, per adapted Linear, A·x 4·T·r (fp32 factors) and its input x when `lora_inputs`
    is "saved": shared with the base's tensor when d = 4 (the q/k/v input d·T·h once, ...), an
    fp32 copy per adapted layer (4·T·in) when d = 2, as the factors are fp32.

    Args:
        shape: Model sizes.
        tokens: Batch size x sequence length.
        seq_len: Sequence length (eager attention's s x s probabilities).
        dtype_bytes: Bytes per activation value (4 for fp32, 2 for bf16/fp16).
        adapted: Leaf names of the block's Linears with a LoRA adapter (ignored with `full`).
        full: Full fine-tuning: every weight trains.
        lora_r: LoRA rank.
        lora_inputs: "saved" (plain autograd, PEFT) or "rebuilt" (lorakit's LoRA Function).
        attention: "sdpa" or "eager".

    Returns:
        Bytes.
    """
    T, s, d = tokens, seq_len, dtype_bytes
    h, f, a = shape.hidden, shape.intermediate, shape.heads
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    in_features = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": f}

    norms = 2 * (4 * T * h + 4 * T)
    if attention == "sdpa":
        attn = d * T * (2 * q + 2 * kv) + 4 * T * a
    else:
        attn = 3 * d * T * q + T * a * s * (4 + (d if d < 4 else 0))
    mlp = 3 * d * T * f
    frozen = norms + attn + mlp
    if full:
        return frozen + 2 * d * T * h + 2 * d * T * h + d * T * f + (d * T * q if attention == "eager" else 0)

    adapted = adapted & BLOCK_LINEARS
    extra = FACTOR_BYTES * T * lora_r * len(adapted)  # A·x per adapter
    if lora_inputs == "saved":
        if d == FACTOR_BYTES:  # the input is the base's own tensor, shared by layers reading it
            inputs = [(QKV, d * T * h), (GATE_UP, d * T * h), ({"down_proj"}, d * T * f)]
            if attention == "eager":  # SDPA keeps o_proj's input anyway
                inputs.append(({"o_proj"}, d * T * q))
            extra += sum(size for group, size in inputs if adapted & group)
        else:  # each adapted layer casts its input to the factors' fp32: a copy each
            extra += sum(FACTOR_BYTES * T * in_features[name] for name in adapted)
    return frozen + extra


@dataclass
class Activations:
    """Activation memory of one training step, in bytes."""

    kept: float  # saved for backward at the end of forward (with checkpointing: layer inputs)
    scratch: float  # live on top of `kept` while the first decoder layer runs backward


def activation_bytes(shape: Shape, batch_size: int, seq_len: int, dtype_bytes: int, adapted: frozenset[str],
                     full: bool, lora_r: int = 0, lora_inputs: str = "saved", attention: str = "sdpa",
                     gradient_checkpointing: bool = False) -> Activations:
    """Activations of a step, without the logits.

    kept: every layer's saved tensors (`layer_activation_bytes`) and the final norm's (4·T·h +
    4·T, plus its normalised input and the head's input, d·T·h each, in full fine-tuning); with
    full checkpointing each layer keeps only its input d·T·h.
    scratch: the gradients of one layer's intermediates, BACKWARD_WORKSPACE_FACTOR·d·T·f; with
    checkpointing also that layer's recomputed activations.

    Args:
        shape: Model sizes.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        dtype_bytes: Bytes per activation value.
        adapted: Leaf names of the Linears with a LoRA adapter.
        full: Full fine-tuning.
        lora_r: LoRA rank.
        lora_inputs: "saved" or "rebuilt" (see `layer_activation_bytes`).
        attention: "sdpa" or "eager".
        gradient_checkpointing: Recompute each layer in backward.

    Returns:
        The two parts, in bytes.
    """
    T, d, h = batch_size * seq_len, dtype_bytes, shape.hidden
    layer = layer_activation_bytes(shape, T, seq_len, d, adapted, full, lora_r, lora_inputs, attention)
    final_norm = 4 * T * h + 4 * T + (2 * d * T * h if full else 0)
    scratch = BACKWARD_WORKSPACE_FACTOR * d * T * shape.intermediate
    if gradient_checkpointing:
        return Activations(kept=shape.layers * d * T * h + final_norm, scratch=layer + scratch)
    return Activations(kept=shape.layers * layer + final_norm, scratch=scratch)


# --- the estimate -------------------------------------------------------------------------------

@dataclass
class Breakdown:
    """Bytes of each component for one way of training, on one rank.

    `base` is the frozen base's part of `weights` (not added again); `buckets` (DDP) and
    `gathered` (FSDP) are 0 in one process.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    scratch: float
    base: float = 0.0
    buckets: float = 0.0
    gathered: float = 0.0

    @property
    def total(self) -> float:
        """Peak: weights + optimizer + buckets + gathered + max(gradients, activations + max(logits, scratch))."""
        return (self.weights + self.optimizer + self.buckets + self.gathered
                + max(self.gradients, self.activations + max(self.logits, self.scratch)))


@dataclass
class MemoryEstimate:
    """An estimate for one model and one set of options, for the three ways of training."""

    model: str
    params: ParamCounts
    settings: dict[str, Any]
    breakdowns: dict[str, Breakdown]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: counts, settings, convention, and bytes per component and mode."""
        params = {"total": self.params.total, "lora_trainable": self.params.lora,
                  "quantized_nf4": self.params.quantized, "lora_targets": self.params.targets,
                  "trainable_line": self.params.trainable_line}
        estimates = {mode: {**{k: int(round(v)) for k, v in asdict(b).items()}, "total": int(round(b.total))}
                     for mode, b in self.breakdowns.items()}
        return {"model": self.model, "params": params, "settings": self.settings,
                "convention": convention(self.settings), "units": "bytes", "estimates": estimates}


def estimate(config, r: int = 8, target_modules: list[str] | str | None = None, dtype: str = "bf16",
             optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 2048,
             gradient_checkpointing: bool = False, double_quant: bool = True, attention: str = "sdpa",
             lora_inputs: str = "auto", model_name: str | None = None, world_size: int = 1,
             strategy: str = "ddp") -> MemoryEstimate:
    """Estimate training memory of `config`'s model for full fine-tuning, LoRA and QLoRA.

    Args: as `memory`, plus `config` (a transformers config) and `model_name` (for display).

    Returns:
        The estimate (bytes per component per mode, on one rank of `world_size`).

    Raises:
        ValueError: an unknown dtype, optimizer, attention, lora_inputs or strategy, a world size
            below 1, fsdp for a model without decoder layer classes, or a bad model/targets.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be sdpa or eager, got {attention!r}")
    if lora_inputs not in ("auto", "saved", "rebuilt"):
        raise ValueError(f"lora_inputs must be auto, saved or rebuilt, got {lora_inputs!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be >= 1")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    optimizer_bytes([], optimizer)  # validates the name
    if lora_inputs == "auto":
        lora_inputs = lorakit_lora_inputs()
    d = DTYPE_BYTES[dtype]
    params = count_parameters(config, r=r, target_modules=target_modules)
    shape = Shape.from_config(config)
    logits = LOGITS_BYTES_PER_VALUE * batch_size * seq_len * shape.vocab
    common = dict(shape=shape, batch_size=batch_size, seq_len=seq_len, dtype_bytes=d, attention=attention,
                  gradient_checkpointing=gradient_checkpointing)
    full_acts = activation_bytes(adapted=frozenset(), full=True, **common)
    lora_acts = activation_bytes(adapted=frozenset(params.targets), full=False, lora_r=r, lora_inputs=lora_inputs,
                                 **common)
    dequant_buffer = d * max(params.quantized_tensors, default=0)  # one 4-bit weight dequantized at a time
    lora_weights = FACTOR_BYTES * params.lora
    lora_optimizer = optimizer_bytes(params.lora_tensors, optimizer)
    qlora_base = sum(nf4_bytes(n, double_quant) for n in params.quantized_tensors) + d * (params.total - params.quantized)
    breakdowns = {
        "full": Breakdown(weights=d * params.total, gradients=d * params.total,
                          optimizer=optimizer_bytes(params.base_tensors, optimizer),
                          activations=full_acts.kept, logits=logits, scratch=full_acts.scratch, base=d * params.total),
        "lora": Breakdown(weights=d * params.total + lora_weights, gradients=lora_weights, optimizer=lora_optimizer,
                          activations=lora_acts.kept, logits=logits, scratch=lora_acts.scratch, base=d * params.total),
        "qlora": Breakdown(weights=qlora_base + lora_weights, gradients=lora_weights, optimizer=lora_optimizer,
                           activations=lora_acts.kept, logits=logits, scratch=lora_acts.scratch + dequant_buffer,
                           base=qlora_base),
    }
    if world_size > 1:
        breakdowns = {mode: per_rank(b, mode, params, d, double_quant, world_size, strategy)
                      for mode, b in breakdowns.items()}
    settings = dict(r=r, target_modules=params.targets, dtype=dtype, optimizer=optimizer, batch_size=batch_size,
                    seq_len=seq_len, gradient_checkpointing=gradient_checkpointing, double_quant=double_quant,
                    attention=attention, lora_inputs=lora_inputs, llama_style=params.llama_style,
                    world_size=world_size, strategy=strategy)
    return MemoryEstimate(model=model_name or getattr(config, "name_or_path", "") or config.model_type,
                          params=params, settings=settings, breakdowns=breakdowns)


def unit_bytes(unit: Unit, mode: str, d: int, double_quant: bool) -> tuple[float, float]:
    """(parameter bytes, trainable-gradient bytes) of one FSDP unit gathered whole, for `mode`."""
    if mode == "full":
        return d * unit.base, d * unit.base
    base = d * unit.base
    if mode == "qlora":
        base = sum(nf4_bytes(n, double_quant) for n in unit.quantized) + d * (unit.base - sum(unit.quantized))
    return base + FACTOR_BYTES * unit.lora, FACTOR_BYTES * unit.lora


def per_rank(single: Breakdown, mode: str, params: ParamCounts, d: int, double_quant: bool, world_size: int,
             strategy: str) -> Breakdown:
    """One rank's share of a one-process breakdown under `strategy` (see the module docstring).

    Args:
        single: The one-process breakdown (activations for one rank's micro-batch).
        mode: "full", "lora" or "qlora".
        params: The counts, with their FSDP units.
        d: Bytes per base value.
        double_quant: NF4 with double quantization.
        world_size: Number of processes (> 1).
        strategy: "ddp" or "fsdp".

    Raises:
        ValueError: fsdp for a model whose decoder layers are not known (no `_no_split_modules`).
    """
    if strategy == "ddp":  # whole replicas, plus the buckets the trainable gradients are reduced in
        return replace(single, buckets=single.gradients)
    if not params.units:
        raise ValueError("--strategy fsdp: this model names no decoder layer class (_no_split_modules), "
                         "so FSDP cannot split it into layers; use --strategy ddp")
    root, layers = params.units[0], params.units[1:]
    root_params, root_grads = unit_bytes(root, mode, d, double_quant)
    layer_bytes = max((sum(unit_bytes(u, mode, d, double_quant)) for u in layers), default=0.0)
    n = world_size
    return replace(single, weights=single.weights / n, base=single.base / n, gradients=single.gradients / n,
                   optimizer=single.optimizer / n, gathered=root_params + root_grads + layer_bytes)


def convention(settings: dict[str, Any]) -> str:
    """How the figures were counted, for the output."""
    dtype = settings["dtype"]
    opt = {"adamw": "AdamW: two fp32 moments (8 B per trainable parameter), fused step (no temporaries)",
           "adamw8bit": "8-bit AdamW: two 8-bit moments + an fp32 absmax per 256 values (~2.03 B per parameter)",
           "sgd": "SGD without momentum: no state"}[settings["optimizer"]]
    bits = nf4_bits_per_param(double_quant=settings["double_quant"])
    inputs = ("rebuilt in backward (lorakit's LoRA Function): an adapter keeps only A·x"
              if settings["lora_inputs"] == "rebuilt" else "saved by each adapter (plain autograd, as PEFT)")
    lines = [
        f"Pure {dtype}: base weights, gradients and activations in {dtype}, no fp32 master copy; "
        "LoRA factors (and their gradients) in fp32.",
        f"{opt}. Gradients set to None between steps; the step keeps the loss, not the logits.",
        f"QLoRA: every Linear but the head in NF4, {bits:.3f} bits/param; embeddings, norms and head in {dtype}.",
        f"LoRA inputs {inputs}.",
        f"Logits: {LOGITS_BYTES_PER_VALUE:g} B per batch x seq x vocab value (fp32 log-softmax, its gradient, "
        "the logits' gradient).",
        "total = weights + optimizer + max(gradients, activations + max(logits, backward scratch)).",
    ]
    world, strategy = settings.get("world_size", 1), settings.get("strategy", "ddp")
    if world > 1:
        extra = "DDP grad buckets" if strategy == "ddp" else "FSDP gathered"
        lines[-1] = f"total per rank = weights + optimizer + {extra} + max(gradients, activations + max(logits, " \
                    "backward scratch))."
    if world > 1 and strategy == "ddp":
        lines.append(f"Per rank of {world} (DDP): the whole model on each rank, plus gradient buckets (a copy of "
                     "the trainable gradients); activations for one rank's micro-batch.")
    elif world > 1:
        lines.append(f"Per rank of {world} (FSDP2): weights (the 4-bit storage too), gradients and optimizer states "
                     f"1/{world} each, plus the root's parameters (embeddings, norm, head) and the largest decoder "
                     "layer's gathered whole with their gradients; activations for one rank's micro-batch.")
    if not settings["llama_style"]:
        lines.append("The activation formula is for Llama-style blocks; for this architecture it is approximate.")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------

def format_table(result: MemoryEstimate) -> str:
    """The side-by-side table, in GB (1e9 bytes) and GiB (2^30 bytes)."""
    s = result.settings
    lines = [f"{result.model}: {result.params.total:,} parameters, "
             f"{result.params.quantized:,} of them in the Linear layers QLoRA quantizes",
             f"LoRA r={s['r']} on {', '.join(s['target_modules'])}",
             result.params.trainable_line,
             f"batch {s['batch_size']} x seq {s['seq_len']}, {s['dtype']}, {s['optimizer']}, "
             f"{s['attention']} attention, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
             f"NF4 {'with' if s['double_quant'] else 'without'} double quant",
             ""]
    rows = dict(ROWS)
    if s["world_size"] > 1:
        lines.insert(-1, f"per rank of {s['world_size']} processes, {s['strategy']} "
                         f"(each rank: a micro-batch of {s['batch_size']})")
        rows = {"weights": ROWS["weights"], "base": DISTRIBUTED_ROWS["base"],
                **{k: v for k, v in ROWS.items() if k not in ("weights", "total")},
                ("buckets" if s["strategy"] == "ddp" else "gathered"): DISTRIBUTED_ROWS[
                    "buckets" if s["strategy"] == "ddp" else "gathered"],
                "total": "total per rank"}
    lines.append(f"{'':18s}" + "".join(f"{MODE_TITLES[m]:>20s}" for m in MODES))
    lines.append(f"{'':18s}" + "".join(f"{'GB':>10s}{'GiB':>10s}" for _ in MODES))
    for key, title in rows.items():
        row = f"{title:18s}"
        for mode in MODES:
            value = getattr(result.breakdowns[mode], key)
            row += f"{value / GB:10.2f}{value / GIB:10.2f}"
        lines.append(row)
    lines += ["", "Convention:"] + ["  " + line for line in convention(s).splitlines()]
    return "\n".join(lines)


def memory(model: str, r: int = 8, target_modules: Optional[list[str]] = None,
           dtype: Literal["fp32", "bf16", "fp16"] = "bf16", optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw",
           batch_size: int = 1, seq_len: int = 2048, gradient_checkpointing: bool = False, double_quant: bool = True,
           attention: Literal["sdpa", "eager"] = "sdpa", lora_inputs: Literal["auto", "saved", "rebuilt"] = "auto",
           world_size: int = 1, strategy: Literal["ddp", "fsdp"] = "ddp", as_json: bool = False) -> dict[str, Any]:
    """Estimate the memory of training MODEL: full fine-tuning, LoRA and QLoRA side by side.

    Args:
        model: A preset (Llama-2-7B, Mistral-7B, Llama-3-8B, Qwen2.5-7B, SmolLM2-135M), a local
            model folder, or a config.json path. Nothing is downloaded.
        r: LoRA rank.
        target_modules: Modules LoRA adapts, comma-separated, or all-linear. Default: the
            architecture's default (q_proj,v_proj for Llama).
        dtype: Precision of base weights, gradients and activations (pure dtype, no master copy).
        optimizer: adamw (fp32 states), adamw8bit (bitsandbytes 8-bit states) or sgd (no momentum).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        gradient_checkpointing: Recompute each decoder layer in backward (keeps only layer inputs).
        double_quant: QLoRA's NF4 with double quantization of the scales (4.127 instead of 4.5 bits).
        attention: sdpa (flash / memory-efficient kernels: no seq x seq matrix) or eager.
        lora_inputs: Whether LoRA layers keep their input for backward: saved (plain autograd,
            PEFT), rebuilt (lorakit's LoRA Function), or auto (what this lorakit does).
        world_size: Processes (GPUs) training together, each on its own micro-batch of
            --batch-size; the figures are per rank.
        strategy: With --world-size above 1: ddp (a whole replica per rank, plus gradient
            buckets) or fsdp (weights, gradients and optimizer states sharded 1/N, plus the
            gathered root and largest decoder layer).
        as_json: Print the estimate as JSON (bytes) instead of a table.

    Returns:
        The estimate as a dict (what --json prints; sizes in bytes).

    Raises:
        ValueError: an unknown model, option or target.
    """
    if target_modules is not None and len(target_modules) == 1 and target_modules[0] == "all-linear":
        target_modules = "all-linear"
    config = load_model_config(model)
    result = estimate(config, r=r, target_modules=target_modules, dtype=dtype, optimizer=optimizer,
                      batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                      double_quant=double_quant, attention=attention, lora_inputs=lora_inputs, model_name=model,
                      world_size=world_size, strategy=strategy)
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_table(result))
    return result.to_dict()


memory.flag_names = {"as_json": "json"}  # the flag is --json
