"""A training run as five typed records: the model, the LoRA config, the data, the optimisation, the run.

    recipe = Recipe.from_flags(data="my.jsonl", r=16, lr=1e-3)        # flat names, as on the CLI
    recipe = Recipe(data=DataSettings(data="my.jsonl"), lora=lora_config(r=16), optim=OptimSettings(lr=1e-3))

Each record's fields and Google-style docstring are the `lorakit train` flags and their help
(`cli.add_record_arguments` derives them; nothing is repeated), and a YAML config is the same
records, either flat (`r: 16`) or one section per record (`lora: {r: 16}`; `cli.parse` reads
both). Every field name is unique across the records, so a flat name says which record it sets. The LoRA record is
`LoraConfig` itself, with the trainer's defaults (`LORA_DEFAULTS`): every field of it is a flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import LoraConfig


@dataclass
class ModelSettings:
    """The base model and how it is held in memory.

    Args:
        model: A local Hugging Face model folder; the embedded SmolLM2-135M-Instruct when omitted.
        device: auto (CUDA when present, then MPS, then CPU), cpu, cuda or mps; under torchrun
            each process takes cuda:LOCAL_RANK.
        dtype: The base model's dtype: auto is bf16 on CUDA and fp32 elsewhere; the adapter stays fp32.
        quantize: nf4 stores every Linear except the output head in 4 bits (QLoRA).
        double_quant: With --quantize nf4, also quantize the 4-bit scales (about 0.37 bit/weight less).
        precision: fp32, or bf16 / fp16 autocast on the device.
        gradient_checkpointing: Recompute activations in backward to save memory (sets use_cache=False).
        strategy: With several processes (torchrun): ddp (every rank holds the whole model) or
            fsdp (FSDP2: the base and the adapter sharded across ranks, per decoder layer).
    """

    model: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    quantize: Literal["none", "nf4"] = "none"
    double_quant: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class DataSettings:
    """The training and validation examples.

    Args:
        data: Training data, comma-separated files, folders or globs: .jsonl, .json (lines or an
            array), .parquet, .csv or a datasets.save_to_disk folder, of Alpaca ({instruction,
            input, output}), chat ({messages}), plain ({text}) or TRL prompt/completion rows.
        val_data: Validation files; otherwise --val-fraction of the training data is held out.
        val_fraction: Share of the training data held out for validation when --val-data is not given.
        data_field: Map other column names onto a row shape: comma-separated field=column pairs
            (e.g. instruction=question,output=answer), or the flag given once per pair.
        max_seq_len: Longer examples are truncated to this many tokens.
        packing: Pack examples into rows of --max-seq-len tokens (positions restart per example,
            no attention across examples; the loss covers the same response tokens).
    """

    data: str | list[str] = ""
    val_data: str | list[str] | None = None
    val_fraction: float = 0.05
    data_field: dict[str, str] = field(default_factory=dict)
    max_seq_len: int = 512
    packing: bool = False


@dataclass
class OptimSettings:
    """How many steps, on what batches, with which optimizer settings.

    Args:
        epochs: Passes over the training data (ignored when --max-steps is set).
        max_steps: Optimizer steps to run; 0 means epochs * steps per epoch.
        batch_size: Examples per micro-batch per process.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        loraplus_ratio: LoRA+: lora_B (and lora_embedding_B) train with lr times this ratio (e.g. 16); 0 is off.
        warmup_steps: Steps of linear warm-up before cosine decay to 0.
        weight_decay: AdamW weight decay.
        grad_clip: Clip the gradient norm to this value; 0 disables.
    """

    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    loraplus_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class RunSettings:
    """Where the run writes, how often, and its seed.

    Args:
        out: Run directory: adapter/, checkpoints/, metrics.jsonl, run_config.yaml.
        seed: Seed for data order, initialisation and dropout.
        log_every: Write a metrics line every N steps.
        eval_every: Validation loss every N steps (0: only at the end).
        save_every: Checkpoint every N steps (0: no intermediate checkpoints).
        resume: Continue from the newest checkpoint in --out.
        quiet: No progress bar.
        report_to: Also send the metrics (loss, lr, grad norm, tokens/s, val loss, peak memory) to
            tensorboard (event files in --out/tensorboard), wandb or mlflow; metrics.jsonl is always written.
    """

    out: str = "runs/lorakit"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    quiet: bool = False
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"


# The trainer's LoRA defaults where they differ from LoraConfig's (PEFT's), and the LoraConfig
# fields a training run sets itself rather than taking as flags.
# Chosen by benchmarks/defaults_grid.py (docs/defaults.md): r=16 on every linear layer at lr 1e-3.
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                                 "task_type": "CAUSAL_LM"}
LORA_FIXED = ("task_type", "peft_type", "base_model_name_or_path", "inference_mode", "fan_in_fan_out")


def lora_config(**fields: Any) -> LoraConfig:
    """A LoraConfig with the trainer's defaults (`LORA_DEFAULTS`) under `fields`.

    A one-item `target_modules` of "all-linear" (how the CLI's comma list gives it) becomes the
    string PEFT expects.

    Raises:
        lorakit.ConfigError: a field has a bad value (see `LoraConfig`).
    """
    return LoraConfig(**(LORA_DEFAULTS | _normalise_lora_fields(fields)))


def _normalise_lora_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A one-item `target_modules` of "all-linear" (how the CLI's comma list gives it) as the string."""
    if fields.get("target_modules") == ["all-linear"]:
        return fields | {"target_modules": "all-linear"}
    return fields


@dataclass(frozen=True)
class Section:
    """One record as the CLI and a YAML file see it: its name, class, and the fields it shows."""

    name: str
    record: type
    defaults: dict[str, Any] = field(default_factory=dict)  # over the record's own
    skip: tuple[str, ...] = ()  # fields that are not flags
    required: tuple[str, ...] = ()  # flags the CLI requires (unless a config file sets them)

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.record) if f.name not in self.skip]


SECTIONS = (
    Section("model", ModelSettings),
    Section("lora", LoraConfig, LORA_DEFAULTS, LORA_FIXED),
    Section("data", DataSettings, required=("data",)),
    Section("optim", OptimSettings),
    Section("run", RunSettings),
)


@dataclass
class Recipe:
    """Everything one training run needs, as five records (see the module docstring)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraConfig = field(default_factory=lora_config)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @classmethod
    def from_flags(cls, **flags: Any) -> Recipe:
        """Build the records from flat flag names (`r=16, lr=1e-3, data="x.jsonl"`), each
        record's defaults under them.

        Raises:
            TypeError: a name no record has (the closest names are not guessed here; the CLI
                refuses unknown flags before this).
        """
        return cls().replace(**flags)

    def replace(self, **flags: Any) -> Recipe:
        """A copy with some flat-named fields changed; every other field, the LoRA record's
        trainer-set ones included (task_type, fan_in_fan_out, ...), is kept.

        Raises:
            TypeError: a name no record has.
        """
        owners = {name: section.name for section in SECTIONS for name in section.field_names()}
        unknown = sorted(set(flags) - set(owners))
        if unknown:
            raise TypeError(f"unknown training settings {unknown}; each must be a field of "
                            + ", ".join(s.record.__name__ for s in SECTIONS))
        changed = {}
        for section in SECTIONS:
            mine = {name: value for name, value in flags.items() if owners[name] == section.name}
            if mine:
                if section.name == "lora":
                    mine = _normalise_lora_fields(mine)
                changed[section.name] = dataclasses.replace(getattr(self, section.name), **mine)
        return dataclasses.replace(self, **changed)

    def to_flags(self) -> dict[str, Any]:
        """Every field, flat, by flag name (the LoRA record's fields the trainer sets left out)."""
        flags: dict[str, Any] = {}
        for section in SECTIONS:
            record = getattr(self, section.name)
            flags.update({name: getattr(record, name) for name in section.field_names()})
        return flags

