"""Which modules of a model a LoraConfig selects.

Rules (PEFT's, so a config selects the same modules here and there):
- `target_modules` as a list: a module path matches a name when it equals it or ends with
  "." + name. As a string: a regex that must match the whole path. "all-linear": every
  Linear / Conv1D except the model's output head.
- `exclude_modules` removes matches (same rules); modules listed in `modules_to_save` are
  never adapted.
- `layers_to_transform` keeps only modules whose layer index (the number after
  `layers_pattern`, or the first numbered path segment) is listed; an empty list keeps all,
  and a module whose full path is listed in `target_modules` is kept whatever its layer.
- None picks the architecture's default from `DEFAULT_TARGET_MODULES`.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .config import ConfigError, LoraConfig

ALL_LINEAR = "all-linear"

# model_type -> default target_modules, as PEFT ships them for LoRA.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

# The head of a classifier is trained in full for SEQ_CLS (PEFT adds it the same way).
SEQ_CLS_HEAD_NAMES = ("classifier", "score")


class TargetError(ValueError):
    """A config's targets do not fit the model."""


def matches(spec: list[str] | str, path: str) -> bool:
    """Whether module `path` is selected by a list of names or a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith("." + name) for name in spec)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer a module belongs to, e.g. 3 for `model.layers.3.mlp.up_proj`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
            if match:
                break
    return int(match.group(1)) if match else None


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The config's target_modules with None and "all-linear" made concrete for this model.

    Raises:
        TargetError: None for an architecture that has no default.
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise TargetError(
                f"target_modules is not set and there is no default for model type {model_type!r}; "
                f"pass target_modules (defaults exist for: {', '.join(sorted(DEFAULT_TARGET_MODULES))})"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = output_head_path(model)
        names = {path.rsplit(".", 1)[-1] for path, module in _candidates(model)
                 if _is_linear(module) and path != head}
        if not names:
            raise TargetError("target_modules='all-linear' found no Linear layer in the model")
        return sorted(names)
    return targets


def output_head_path(model: nn.Module) -> str | None:
    """Path of the model's output embedding (e.g. `lm_head`), or None if it has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((path for path, module in model.named_modules() if module is head), None)


def select_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths to wrap with LoRA, in model order.

    Raises:
        TargetError: nothing matched; the message names the module types and some names
            that do exist.
    """
    targets = resolve_target_modules(model, config)
    # modules_to_save and full-string `all-linear` resolution may turn targets into a list
    if isinstance(targets, str) and config.layers_to_transform is not None:
        raise ConfigError("layers_to_transform cannot be combined with a regex target_modules")
    selected, excluded, outside_layers = [], [], []
    for path, _module in _candidates(model):
        if not path or not matches(targets, path):
            continue
        if config.exclude_modules and matches(config.exclude_modules, path):
            excluded.append(path)
            continue
        if config.modules_to_save and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path)
                                          for m in config.modules_to_save):
            continue
        wanted = config.layers_to_transform
        # As PEFT: an empty list means every layer, and a module named by its full path is not filtered.
        if wanted not in (None, []) and not (isinstance(targets, list) and path in targets):
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if layer_index(path, config.layers_pattern) not in wanted:
                outside_layers.append(path)
                continue
        selected.append(path)
    if not selected:
        message = _no_match_message(model, targets, excluded)
        if outside_layers:
            message += (f". ({len(outside_layers)} matches are in layers outside "
                        f"layers_to_transform={config.layers_to_transform!r}.)")
        raise TargetError(message)
    return selected


def select_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules trained in full (modules_to_save, plus the head for SEQ_CLS).

    Raises:
        TargetError: a listed module exists nowhere in the model.
    """
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names and hasattr(model, n)]
    paths = []
    for name in names:
        found = [path for path, _ in _candidates(model) if path and matches([name], path)]
        if not found and name not in SEQ_CLS_HEAD_NAMES:
            raise TargetError(f"modules_to_save: no module named {name!r} in the model")
        paths += [p for p in found if p not in paths]
    return paths


def _candidates(model: nn.Module):
    """(path, module) for every module outside LoRA wrappers' internals, in `named_modules` order
    (a module reachable twice is listed once); a wrapper is listed, its insides are not."""
    from .layers import LoraLayer, ModulesToSave

    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if not isinstance(module, (LoraLayer, ModulesToSave)):
            children = [(f"{path}.{name}" if path else name, child)
                        for name, child in module._modules.items() if child is not None]
            stack.extend(reversed(children))


def _is_linear(module: nn.Module) -> bool:
    """A linear layer for "all-linear": nn.Linear, GPT-2's Conv1D, a quantized linear layer, or
    a LoRA wrapper of one."""
    from .dispatch import conv1d_type
    from .layers import Linear
    from .quant.registry import layer_types

    conv1d = conv1d_type()
    return isinstance(module, (nn.Linear, Linear, *layer_types(), *([conv1d] if conv1d else [])))


def _no_match_message(model: nn.Module, targets: list[str] | str, excluded: list[str]) -> str:
    counts = Counter(type(m).__name__ for path, m in _candidates(model) if path)
    types = ", ".join(f"{name} ({n})" for name, n in counts.most_common(8))
    leaf_names = []
    for path, module in _candidates(model):
        leaf = path.rsplit(".", 1)[-1]
        if path and not list(module.children()) and not leaf.isdigit() and leaf not in leaf_names:
            leaf_names.append(leaf)
    msg = (f"target_modules {targets!r} matched no module of the model. "
           f"Module types present: {types}. Leaf module names present: {', '.join(leaf_names[:12])}")
    if excluded:
        msg += f". ({len(excluded)} matches were removed by exclude_modules.)"
    return msg
