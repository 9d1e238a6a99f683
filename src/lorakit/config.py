"""LoraConfig: the fields of an adapter, their defaults, validation, and the JSON dict on disk.

The field names and defaults are PEFT's, so an `adapter_config.json` written here loads in PEFT
and one written by PEFT loads here. Fields PEFT writes that lorakit does not use are tolerated
on load with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_files

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """PEFT's task labels. A member equals its string (``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """PEFT's method labels; lorakit implements LORA only (the others are named so that PEFT code
    comparing against them reads the same)."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"

    def __str__(self) -> str:
        return self.value


PEFT_TYPE = PeftType.LORA.value
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora")  # and "pissa_niter_<K>" (K >= 1)
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
TASK_TYPES = tuple(t.value for t in TaskType)

# Fields PEFT writes whose default value means "feature off"; a file may carry them harmlessly.
# Any of them set to something else is a feature lorakit does not implement: refuse it.
_PEFT_OFF_FIELDS: dict[str, tuple[Any, ...]] = {
    "layer_replication": (None,),
    "loftq_config": (None, {}),
    "megatron_config": (None,),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "eva_config": (None,),
    "corda_config": (None,),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
}
# Fields PEFT writes that carry no meaning for lorakit whatever their value.
_PEFT_IGNORED_FIELDS = {
    "peft_version", "auto_mapping", "revision", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "runtime_config",
}


class ConfigError(ValueError):
    """A LoraConfig field holds a value lorakit cannot use."""


class AdapterLoadError(ValueError):
    """An adapter directory cannot be loaded: the message names the file or keys and the cause."""


class PeftConfig:
    """PEFT's config base class: what every adapter config can do with a folder.

        config = PeftConfig.from_pretrained("out/adapter")      # a LoraConfig
        base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)

    lorakit has one method, so every config is a `LoraConfig`; `isinstance(c, PeftConfig)` holds
    for it, as in PEFT.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs: Any) -> LoraConfig:
        """Read `<folder>[/<subfolder>]/adapter_config.json` (strict, see `LoraConfig.from_dict`).

        Args:
            pretrained_model_name_or_path: A local adapter folder (lorakit never downloads).
            subfolder: A folder inside it, as PEFT's `subfolder=` (e.g. another adapter's).
            **kwargs: Fields to override after reading, or hub-only arguments (`revision`,
                `token`, `cache_dir`, ...), which are refused when they would need the hub.

        Raises:
            AdapterLoadError: the folder or its config is missing or invalid, or it names a hub id.
        """
        folder = resolve_adapter_dir(pretrained_model_name_or_path, subfolder=subfolder, **pop_hub_arguments(kwargs))
        config = read_config(folder)
        fields = {f.name for f in dataclasses.fields(config)}
        overrides = {k: v for k, v in kwargs.items() if k in fields}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"PeftConfig.from_pretrained() got unexpected arguments {unknown}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` into `save_directory` (created if missing), atomically."""
        write_files(Path(save_directory), {CONFIG_NAME: config_bytes(self)})


# Arguments PEFT's loaders pass on to the hub; lorakit reads local folders only.
HUB_ARGUMENTS = ("revision", "token", "use_auth_token", "cache_dir", "force_download", "proxies",
                 "local_files_only", "resume_download", "trust_remote_code")


def pop_hub_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the hub-only arguments (`HUB_ARGUMENTS`) out of `kwargs` and return them."""
    return {k: kwargs.pop(k) for k in HUB_ARGUMENTS if k in kwargs}


@dataclass
class LoraConfig(PeftConfig):
    """Settings of one LoRA adapter, by PEFT's names (a bare `LoraConfig()` has PEFT's defaults;
    `lorakit train` sets its own, see `lorakit.train.recipe.LORA_DEFAULTS`).

    Args:
        r: Rank of the update ΔW = B·A. Default 8.
        lora_alpha: Scale numerator: the LoRA output is multiplied by lora_alpha / r
            (lora_alpha / sqrt(r) with `use_rslora`). Default 8.
        target_modules: Which modules get an adapter: a list of names, each matching a module
            path exactly or as its dotted suffix (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``); a regex string that must match the whole
            path; or ``"all-linear"`` (every Linear/Conv1D except the output head). None picks
            the architecture's default from `targeting.DEFAULT_TARGET_MODULES`.
        exclude_modules: Modules never adapted, matched like `target_modules` (list or regex).
        lora_dropout: Dropout probability on the LoRA path's input, in [0, 1). Default 0.
        bias: Which biases train: "none" (default), "all" (every bias in the model) or
            "lora_only" (biases of adapted layers).
        fan_in_fan_out: True when the base layer stores its weight as (in, out), as GPT-2's
            Conv1D does. Set automatically for Conv1D.
        use_rslora: Use lora_alpha / sqrt(r) as the scaling (rank-stabilised LoRA).
        use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output row rescales
            W + ΔW (see `lorakit.layers.dora`). Linear and GPT-2 Conv1D targets only; not with
            `lora_bias` (as in PEFT). Default False.
        init_lora_weights: True (kaiming-uniform A, zero B: the adapted model starts equal to
            the base), "gaussian" (A normal with std 1/r, zero B), False (both random;
            for tests), "pissa" (A, B from the top-r singular triplets of W),
            "pissa_niter_K" (the same from a randomised SVD with K iterations) or "olora"
            (A, B from the QR decomposition of W). The last three also replace W by the
            residual W - scaling·B·A (linear layers only; see `lorakit.layers.init` and, for
            using the trained adapter on the original base, `lorakit.convert`).
        layers_to_transform: Layer indices (or one index) to adapt; others are left alone. As in
            PEFT, an empty list adapts every layer and a full module path in target_modules is
            adapted whatever its layer.
        layers_pattern: Name of the module list holding the layers (e.g. "layers", "h"),
            used to find a module's layer index. None: the first numbered path segment.
        rank_pattern: {regex: r} overriding `r` for modules whose path ends with a match.
        alpha_pattern: {regex: alpha} overriding `lora_alpha` likewise.
        modules_to_save: Modules (by name, like `target_modules`) trained in full and saved
            with the adapter, e.g. a classifier head.
        lora_bias: Give lora_B a bias (merged into the base bias). Only with
            init_lora_weights True or False, as in PEFT.
        task_type: PEFT's task label, e.g. "CAUSAL_LM" or "SEQ_CLS".
        base_model_name_or_path: The base model the adapter was trained on.
        inference_mode: True when the adapter was saved or loaded for inference only.

    Raises:
        ConfigError: on any value outside the ranges above.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    lora_bias: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = PEFT_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):  # TaskType members are stored as their plain string
            self.task_type = self.task_type.value
        if isinstance(self.peft_type, enum.Enum):
            self.peft_type = self.peft_type.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of regex -> value, got {value!r}")
            setattr(self, name, dict(value or {}))
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        if self.peft_type != PEFT_TYPE:
            raise ConfigError(f"peft_type is {self.peft_type!r}; lorakit reads only LoRA adapters (peft_type 'LORA')")
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        if not valid_init(self.init_lora_weights):
            raise ConfigError(
                f"init_lora_weights must be one of {INIT_MODES} or 'pissa_niter_K' (K >= 1), "
                f"got {self.init_lora_weights!r}"
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(f"lora_bias=True needs init_lora_weights True or False (as in PEFT), "
                              f"got {self.init_lora_weights!r}")
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
            if not isinstance(getattr(self, name), bool):  # "no" or 0 is not a boolean
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.use_dora and self.lora_bias:
            raise ConfigError("lora_bias=True is not supported with use_dora=True (DoRA), as in PEFT")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"{name} must be a list of module names or a regex string, got {value!r}")
            elif isinstance(value, str):
                _check_regex(name, value)
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                if not isinstance(key, str) or not key:
                    raise ConfigError(f"{name} keys must be regex strings, got {key!r}")
                _check_regex(f"{name} key", key)
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, list) or
                                                 not all(isinstance(v, str) for v in self.modules_to_save)):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if isinstance(layers, int) else layers
            if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
                raise ConfigError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
            if isinstance(self.target_modules, str):
                raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; "
                                  "put the layer indices in the regex instead")
        if self.layers_pattern and layers is None:
            raise ConfigError("layers_pattern is only meaningful with layers_to_transform")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    # --- per-module values -------------------------------------------------------------------

    def rank_for(self, module_path: str) -> int:
        """The rank of the module at `module_path`: the first matching `rank_pattern` or `r`."""
        key = pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the module at `module_path`: the first matching `alpha_pattern` or `lora_alpha`."""
        key = pattern_key(self.alpha_pattern, module_path)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # --- the adapter_config.json dict -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT reads (every field, lists for sets)."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], (set, tuple)):
                out[key] = sorted(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from an `adapter_config.json` dict.

        Unknown fields are dropped with a warning; PEFT fields holding their "off" value are
        dropped silently; a PEFT feature that is switched on but not implemented here is refused.

        Raises:
            ConfigError: the dict is not a LoRA config, or a value is invalid or unsupported.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type is None:
            raise ConfigError("adapter config has no 'peft_type'; expected 'LORA'")
        if peft_type != PEFT_TYPE:
            raise ConfigError(f"adapter config has peft_type {peft_type!r}; lorakit reads only 'LORA' adapters")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_OFF_FIELDS:
                if value not in _PEFT_OFF_FIELDS[key]:
                    raise ConfigError(f"adapter config sets {key}={value!r}, a PEFT feature lorakit does not support")
            elif key not in _PEFT_IGNORED_FIELDS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"adapter config: ignoring unknown fields {sorted(unknown)}", stacklevel=2)
        if "init_lora_weights" in kwargs and not valid_init(kwargs["init_lora_weights"]):
            # A loaded adapter's init mode does not matter (weights come from the file), except
            # for modes that change the base ("pissa", "olora": rerun on load, as PEFT does, so
            # the base becomes the residual again); PEFT writes e.g. "corda" or "eva" here.
            raise ConfigError(f"adapter config: init_lora_weights={kwargs['init_lora_weights']!r} is not supported")
        try:
            return cls(**kwargs)
        except TypeError as err:  # a field of the wrong type that dataclass itself rejects
            raise ConfigError(f"adapter config: {err}") from err


def _accept_peft_fields(dataclass_init):
    """Wrap LoraConfig's generated __init__ so that PEFT's LoraConfig fields lorakit does not have
    are accepted when they hold their "off" value (code written for PEFT passes them) and refused
    with a named ConfigError when they switch a feature on. A name PEFT does not have either is
    still a TypeError, as for any misspelt argument."""

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        for key in [k for k in kwargs if k in _PEFT_OFF_FIELDS or k in _PEFT_IGNORED_FIELDS]:
            value = kwargs.pop(key)
            if key in _PEFT_OFF_FIELDS and value not in _PEFT_OFF_FIELDS[key]:
                raise ConfigError(f"{key}={value!r} switches on a PEFT feature lorakit does not implement; "
                                  f"leave {key} out")
        dataclass_init(self, *args, **kwargs)

    return __init__


LoraConfig.__init__ = _accept_peft_fields(LoraConfig.__init__)


def valid_init(value: Any) -> bool:
    """Whether `value` is an `init_lora_weights` lorakit implements (True, False, a name of
    INIT_MODES, or "pissa_niter_K" with K >= 1; not 0 or 1 standing in for a bool)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, str) and (value in INIT_MODES or _PISSA_NITER.fullmatch(value) is not None)


def pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """The first key of `patterns` whose regex matches the end of `module_path`, else None.

    A key matches when ``module_path`` is ``<anything>.<key>`` or ``<key>`` as a regex, as PEFT
    matches `rank_pattern` and `alpha_pattern`.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


MAX_RANK = 2 ** 16  # above any layer's width in use; a larger rank cannot even be allocated sensibly


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise ConfigError(f"{name} must be an integer >= 1 and <= {MAX_RANK}, got {value!r}")


MAX_ALPHA = 1e6  # far above any alpha in use (typically <= 2r); larger values make the outputs overflow


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_ALPHA:
        raise ConfigError(f"{name} must be a finite number in (0, {MAX_ALPHA:g}], got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{name} {pattern!r} is not a valid regular expression: {err}") from None


# --- adapter_config.json on disk ---------------------------------------------------------------

def config_bytes(config: LoraConfig, inference_mode: bool | None = None) -> bytes:
    """`adapter_config.json`'s bytes: every field, sorted keys, indent 2 (optionally with
    `inference_mode` overridden: a saved adapter is for inference until loaded trainable)."""
    data = config.to_dict()
    if inference_mode is not None:
        data["inference_mode"] = inference_mode
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> Path:
    """The local adapter folder for PEFT's `model_id` (+ `subfolder`); lorakit never downloads.

    Hub-only arguments (`revision`, `token`, ...) are accepted and ignored for a local folder.

    Raises:
        AdapterLoadError: the folder does not exist; for a name that looks like a hub id (or with
            hub arguments) the message says lorakit works offline and how to get the folder.
        TypeError: an argument that is not one of `HUB_ARGUMENTS`.
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_ARGUMENTS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} (lorakit takes PEFT's arguments; these are not "
                        "among them)")
    folder = Path(model_id).expanduser()
    if subfolder:
        folder = folder / subfolder
    if folder.is_dir():
        return folder
    given = sorted(k for k, v in hub_kwargs.items() if v not in (None, False))
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(model_id)) or given:
        revision = f" --revision {hub_kwargs['revision']}" if hub_kwargs.get("revision") else ""
        raise AdapterLoadError(
            f"adapter {str(folder)!r} is not a local folder{' (given ' + ', '.join(given) + ')' if given else ''}: "
            "lorakit loads adapters from local folders only and never contacts the Hugging Face Hub; "
            f"download it first (e.g. `hf download {model_id}{revision} --local-dir ./adapter`) and pass that folder")
    raise AdapterLoadError(f"adapter directory {str(folder)!r} does not exist")


def read_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse and validate `<directory>/adapter_config.json`.

    Raises:
        AdapterLoadError: missing, not JSON, or not a valid LoRA config.
    """
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AdapterLoadError(f"adapter directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing: not an adapter directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path} is not valid JSON: {err}") from err
    except RecursionError:
        raise AdapterLoadError(f"{path} is nested too deeply to be an adapter config") from None
    except OSError as err:  # no permission, a device error, ...
        raise AdapterLoadError(f"{path} cannot be read: {err}") from err
    try:
        return LoraConfig.from_dict(data)
    except ConfigError as err:
        raise AdapterLoadError(f"{path}: {err}") from err
