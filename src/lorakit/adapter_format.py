"""Adapter directories on disk, in PEFT's format. The only module that knows file names and keys.

    <dir>/adapter_config.json         LoraConfig.to_dict(), sorted keys, indent 2
    <dir>/adapter_model.safetensors   metadata {"format": "pt"}
    <dir>/README.md                   the model card (`lorakit.model_card`), unless the user wrote one

A new folder is written whole under a temporary name and renamed into place; into an existing
folder each file is written to a temporary name and renamed. Files get the user's umask.

A file key is the parameter's path in the wrapped model with the adapter name removed, under
`base_model.model.`:

    model state key   layers.0.q_proj.lora_A.default.weight      (in LoraModel.model)
    file key          base_model.model.layers.0.q_proj.lora_A.weight

Loading is strict and staged: every tensor is read and checked (NaN/inf, names, shapes) before
the first one is copied into the model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .config import CONFIG_NAME, AdapterLoadError, LoraConfig, config_bytes, read_config
from .files import write_files
from .layers.routing import BASE_ADAPTER
from .model_card import CARD_MARKER, CARD_NAME, model_card

if TYPE_CHECKING:
    from .model import LoraModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


# --- naming --------------------------------------------------------------------------------------

def check_adapter_name(name: str) -> None:
    """Adapter names are plain names: letters, digits, '_' and '-'.

    Raises:
        ValueError: the name is empty, reserved, or holds any other character ('.', '/', ...).
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ADAPTER:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' and '-' "
                         f"(and not the reserved {BASE_ADAPTER!r})")


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT keeps an adapter: the directory itself for "default", else a subfolder."""
    root = Path(save_directory)
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


# --- the key grammar -------------------------------------------------------------------------------
#
# In the wrapped model (`LoraModel.model.state_dict()`), an adapter's own tensors are
#     <module>.<tensor>.<adapter>[.weight|.bias]      tensor: lora_A, lora_B, lora_embedding_A/B,
#                                                     lora_magnitude_vector (DoRA)
#     <module>.modules_to_save.<adapter>.<rest>       a module trained in full
# and the frozen originals are <module>.base_layer.<leaf> and <module>.original_module.<rest>.
# In a file the adapter name goes and KEY_PREFIX comes first:
#     base_model.model.<module>.<tensor>[.weight|.bias]    (DoRA's magnitude: no leaf)
#     base_model.model.<module>.<rest>

_STATE_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<tensor>lora_[A-Za-z_]+)\.(?P<adapter>[A-Za-z0-9_\-]+)"
                           r"(?:\.(?P<leaf>weight|bias))?$")
_STATE_COPY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[A-Za-z0-9_\-]+)(?P<rest>\..+)$")
_ADAPTER_PART = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save)\.")
_FILE_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<factor>[AB])(?:\.(?P<leaf>weight|bias))?$")


@dataclass(frozen=True)
class FactorKey:
    """A LoRA factor's file key, parsed: `<module>.lora_[embedding_]<factor>[.<leaf>]`."""

    module: str       # the adapted module's path in the user's model
    factor: str       # "A" or "B"
    embedding: bool   # an Embedding's factor (a bare parameter: no leaf)
    leaf: str         # "weight", "bias" (lora_B's bias) or ""


def is_adapter_tensor(state_key: str) -> bool:
    """Whether a state key of the wrapped model belongs to some adapter (a LoRA factor, a DoRA
    magnitude, a modules_to_save copy) rather than to the base model."""
    return _ADAPTER_PART.search(state_key) is not None


def is_frozen_original(state_key: str) -> bool:
    """Whether a state key is the original of a module trained in full (`<module>.original_module.`)."""
    return ".original_module." in state_key or state_key.startswith("original_module.")


def file_key(state_key: str, adapter_name: str) -> str | None:
    """The file key of one of `adapter_name`'s own tensors, None for any other state key."""
    match = _STATE_TENSOR.match(state_key)
    if match and match["adapter"] == adapter_name:
        leaf = "" if match["tensor"] == "lora_magnitude_vector" or not match["leaf"] else "." + match["leaf"]
        return f"{KEY_PREFIX}{match['module']}.{match['tensor']}{leaf}"
    match = _STATE_COPY.match(state_key)
    if match and match["adapter"] == adapter_name:
        return f"{KEY_PREFIX}{match['module']}{match['rest']}"
    return None


def adapted_module(state_key: str) -> str:
    """The path of the LoRA layer owning a `<module>.lora_*...` state key."""
    match = _STATE_TENSOR.match(state_key)
    if match is None:
        raise ValueError(f"{state_key!r} is not a LoRA tensor's state key")
    return match["module"]


def parse_factor_key(key: str) -> FactorKey | None:
    """A LoRA factor's file key (with or without KEY_PREFIX) parsed, None for any other key."""
    match = _FILE_FACTOR.match(key.removeprefix(KEY_PREFIX))
    if match is None:
        return None
    return FactorKey(match["module"], match["factor"], bool(match["embedding"]), match["leaf"] or "")


def module_of_file_key(key: str) -> str:
    """The module a file key belongs to: the adapted module of a factor, else the key without its leaf."""
    factor = parse_factor_key(key)
    if factor is not None:
        return factor.module
    return key.removeprefix(KEY_PREFIX).rsplit(".", 1)[0]


def key_map(lora_model: LoraModel, adapter_name: str,
            state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """File keys of an adapter, mapped to model state keys.

    `state` is the model's `state_dict(keep_vars=True)` if the caller has it already.

    Returns:
        (required, optional): `required` holds the adapter's own tensors (LoRA factors and
        modules_to_save copies); `optional` holds base tensors a file may carry (biases when
        the adapter trains them, the base weight of an adapted embedding, which PEFT saves).
        Only `required` and the biases are written by `save_adapter`.
    """
    config = lora_model.peft_config[adapter_name]
    layers = [(path, layer) for path, layer in lora_model.lora_layers() if adapter_name in layer.adapters]
    adapted = {path for path, _ in layers}
    embeddings = {path for path, layer in layers if "lora_embedding_A" in layer.factor_names}
    required, optional = {}, {}
    for state_key in (state if state is not None else lora_model.model.state_dict(keep_vars=True)):
        own = file_key(state_key, adapter_name)
        if own is not None:
            required[own] = state_key
        elif not is_adapter_tensor(state_key) and not is_frozen_original(state_key):  # a base tensor
            module_path, _, leaf = state_key.rpartition(".")
            owner = module_path.removesuffix(".base_layer")
            if leaf == "bias" and (config.bias == "all" or config.bias == "lora_only" and owner in adapted):
                optional[KEY_PREFIX + state_key] = state_key
            elif leaf == "weight" and module_path.endswith(".base_layer") and owner in embeddings:
                optional[KEY_PREFIX + state_key] = state_key
    return required, optional


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what an adapter file may hold


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or inf.

    A sum is the cheapest full pass (NaN and inf propagate into it); only a non-finite sum,
    which a finite tensor of huge values can also give, is confirmed element by element.
    """
    return [key for key, t in tensors.items()
            if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all()]


# --- writing -------------------------------------------------------------------------------------

def adapter_tensors(lora_model: LoraModel, adapter_name: str,
                    state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes, under their file keys (detached, contiguous, on CPU).

    `state` is a state dict of the user's model to read them from (e.g. gathered from shards);
    default: the model's own.

    Raises:
        AdapterLoadError: `state` lacks some of the adapter's tensors.
    """
    required, optional = key_map(lora_model, adapter_name)
    if state is None:
        state = lora_model.model.state_dict()
    else:
        missing = sorted(v for v in required.values() if v not in state)
        if missing:
            raise AdapterLoadError(f"the state dict given lacks {len(missing)} of adapter {adapter_name!r}'s "
                                   f"tensors: {_few(missing)}")
    bias_keys = {k: v for k, v in optional.items() if v.endswith("bias")}
    return {file_key: state[state_key].detach().to("cpu").contiguous().clone()
            for file_key, state_key in {**required, **bias_keys}.items() if state_key in state}


def save_adapter(lora_model: LoraModel, save_directory: str | os.PathLike, adapter_name: str,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one adapter's config, weights and model card; returns the folder written.

    Raises:
        ValueError: the adapter holds NaN or inf (nothing is written).
    """
    out = adapter_dir(save_directory, adapter_name)
    write_adapter(out, lora_model.peft_config[adapter_name], adapter_tensors(lora_model, adapter_name, state),
                  what=f"adapter {adapter_name!r}")
    return out


def write_adapter(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor],
                  what: str = "adapter") -> None:
    """Write a config (with inference_mode=True) and file-keyed tensors as an adapter folder.

    Args:
        directory: The adapter folder (created if missing).
        config: Its config.
        tensors: File key -> tensor (on CPU, contiguous).
        what: How error messages name the adapter.

    Raises:
        ValueError: a tensor holds NaN or inf (nothing is written).
    """
    bad = nonfinite_keys(tensors)
    if bad:
        raise ValueError(f"{what} holds NaN or inf in {bad[:5]}; not saving it")
    out = Path(directory)
    files = {WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}
    card = out / CARD_NAME
    if not card.exists() or CARD_MARKER in card.read_text(errors="replace"):  # never the user's own README
        files[CARD_NAME] = model_card(config, folder_name=str(out)).encode()
    files[CONFIG_NAME] = config_bytes(config, inference_mode=True)  # last: a config means a complete folder
    write_files(out, files)


# --- reading -------------------------------------------------------------------------------------

def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory into memory and check it on its own (no model involved).

    Args:
        directory: The adapter folder.
        allow_pickle: Accept `adapter_model.bin` when there is no safetensors file; it is
            loaded with `torch.load(weights_only=True)`.

    Raises:
        AdapterLoadError: a missing or malformed file, a pickle without `allow_pickle`, or a
            tensor holding NaN or inf (named).
    """
    config = read_config(directory)
    weights, pickled = Path(directory) / WEIGHTS_NAME, Path(directory) / PICKLE_WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from err
    elif pickled.is_file():
        if not allow_pickle:
            raise AdapterLoadError(f"{pickled} is a pickle file, which can run code when loaded; "
                                   "pass allow_pickle=True to load it (with weights_only=True) if you trust it")
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad pickle
            raise AdapterLoadError(f"{pickled} could not be loaded: {err}") from err
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterLoadError(f"{pickled} does not hold a dict of tensors")
    else:
        raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}")
    not_float = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in WEIGHT_DTYPES]
    if not_float:
        raise AdapterLoadError(f"{weights}: adapter weights must be floating point (float16, bfloat16, float32 "
                               f"or float64); {len(not_float)} are not: {_few(sorted(not_float))}")
    bad = nonfinite_keys(tensors)
    if bad:
        raise AdapterLoadError(f"{weights}: tensors hold NaN or inf: {bad[:5]}")
    return config, tensors


def load_weights(lora_model: LoraModel, adapter_name: str, tensors: dict[str, torch.Tensor], source: str = "") -> None:
    """Copy an adapter's tensors into the (already injected) adapter, all checks first.

    Raises:
        AdapterLoadError: keys without the `base_model.model.` prefix, missing keys, unexpected
            keys or shape mismatches, each named; nothing has been copied then.
    """
    state = lora_model.model.state_dict(keep_vars=True)
    required, optional = key_map(lora_model, adapter_name, state)
    where = f"adapter {source!r}" if source else f"adapter {adapter_name!r}"
    problems = []
    no_prefix = sorted(k for k in tensors if not k.startswith(KEY_PREFIX))
    if no_prefix:
        problems.append(f"keys without the {KEY_PREFIX!r} prefix: {_few(no_prefix)}")
    missing = sorted(set(required) - set(tensors))
    if missing:
        problems.append(f"{len(missing)} missing keys (the model expects them): {_few(missing)}")
    unexpected = sorted(set(tensors) - set(required) - set(optional) - set(no_prefix))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (nothing in the model takes them; "
                        f"is this adapter for another base model?): {_few(unexpected)}")
    all_keys = {**optional, **required}
    mismatched = [f"{k}: file {tuple(t.shape)} vs model {tuple(state[all_keys[k]].shape)}"
                  for k, t in sorted(tensors.items()) if k in all_keys and tuple(t.shape) != tuple(state[all_keys[k]].shape)]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (adapter for another base model or rank?): {_few(mismatched)}")
    if problems:
        raise AdapterLoadError(f"cannot load {where}: " + "; ".join(problems))
    modules: dict[str, torch.nn.Module] | None = None
    with torch.no_grad():
        for file_key, tensor in tensors.items():
            state_key = all_keys[file_key]
            target = state[state_key]
            if target.is_meta:  # created by add_adapter(low_cpu_mem_usage=True): the file's tensor becomes it
                modules = modules if modules is not None else dict(lora_model.model.named_modules())
                _replace_parameter(modules, state_key, target, tensor)
            elif tensor.dtype == target.dtype and tensor.device == target.device and tensor.is_contiguous():
                target.data = tensor  # the file's tensor becomes the parameter's storage: no copy
            else:
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def _replace_parameter(modules: dict[str, torch.nn.Module], state_key: str, old: torch.Tensor,
                       tensor: torch.Tensor) -> None:
    """Swap a meta-device factor for a parameter holding `tensor`, on its layer's base device."""
    owner_path, _, leaf = state_key.rpartition(".")
    device = modules[adapted_module(state_key)].base_weight.device
    value = tensor.to(device=device, dtype=old.dtype)
    setattr(modules[owner_path], leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
