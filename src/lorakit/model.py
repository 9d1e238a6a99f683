"""Adapters on a model: injection, switching, merging, unloading, counting.

    peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

`PeftModel` (what users hold) -> `.base_model`: `LoraModel` (owns the adapters) -> `.model`: the
user's model, whose target layers are replaced in place by LoRA wrappers. Module paths are
PEFT's, so parameter names are `base_model.model.<path>.lora_A.<adapter>.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import uuid
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import adapter_format, dispatch
from .adapter_format import check_adapter_name
from .config import LoraConfig
from .layers import BASE_ADAPTER, VARIANTS, AdapterRouting, AdapterSpec, LoraLayer, ModulesToSave, choose_variant
from .layers.base import QuantizedMergeError, check_finite_merge
from .quant.registry import model_quantizer
from .layers import init as weight_init
from .targeting import ALL_LINEAR, resolve_target_modules, select_modules_to_save, select_targets

# PEFT 0.21's words when a model that already holds adapters is wrapped again (emitted the same way,
# so code and tests written against PEFT see the same warnings).
SECOND_INJECTION_WARNING = ("You are trying to modify a model with PEFT for a second time. If you want to reload the "
                            "model with a different config, make sure to call `.unload()` before.")
SECOND_WRAPPER_WARNING = ("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                          "adapters in the model. Make sure to know what you are doing!")


def warn_user(message: str) -> None:
    """Warn, attributing the warning to the first caller outside lorakit (the user's line)."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def follow_mode(wrapper: nn.Module, training: bool) -> None:
    """Put `wrapper` and its submodules in train/eval mode `training`, touching only those not in it
    already (the new adapter's modules), rather than `train()`'s walk over every submodule."""
    for module in wrapper.modules():
        if module.training != training:
            module.training = training


def wrapper_adapters(module: nn.Module) -> list[str]:
    """The adapters a module holds: a wrapper's names, none for any other module."""
    return list(module.adapters) if isinstance(module, (LoraLayer, ModulesToSave)) else []


def holds_adapters(model: nn.Module) -> bool:
    """Whether any module of `model` is a lorakit wrapper (LoRA layer or modules_to_save copy)."""
    return any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())


def base_model_name(model: nn.Module) -> str | None:
    """The name or path the user loaded `model` from, as they gave it (None for a model built from
    a config): what an adapter records as `base_model_name_or_path`."""
    name = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


def shared_registry(model: nn.Module) -> dict[str, LoraConfig] | None:
    """The adapter registry an earlier LoraModel left on `model` (`model.peft_config`), if the model
    still holds its adapters; None otherwise (including a registry of another library's configs)."""
    registry = model.__dict__.get("peft_config")
    if (isinstance(registry, dict) and registry and all(isinstance(c, LoraConfig) for c in registry.values())
            and holds_adapters(model)):
        return registry
    return None


@dataclasses.dataclass
class _Undo:
    """The state `LoraModel._restore` puts back after a failed injection or load."""

    active_adapter: str
    routing: list[tuple[LoraLayer | ModulesToSave, list[str]]]  # each wrapper's active adapters
    flags: dict[int, bool]                                      # requires_grad by parameter identity
    base_weights: list[tuple[torch.Tensor, torch.Tensor]]       # (weight, copy) rewritten by PiSSA/OLoRA


# (layer, [(tensor, its copy before the merge)], the layer's merged adapters before it)
_MergeUndo = tuple[LoraLayer, list[tuple[torch.Tensor, torch.Tensor]], list[str]]


def _adapter_entries(wrapper: LoraLayer | ModulesToSave) -> tuple:
    """What a wrapper holds per adapter, in order (the modules themselves, not copies), and which
    adapters it runs: enough for `_put_back_entries` to undo any adding, removing or activating."""
    if isinstance(wrapper, ModulesToSave):
        return list(wrapper.modules_to_save.items()), wrapper.active_adapter
    attrs = sorted({attr for name in wrapper.adapters for attr in wrapper.containers(name)})
    return ({attr: list(getattr(wrapper, attr).items()) for attr in attrs}, dict(wrapper.adapters),
            list(wrapper.active_adapters), list(wrapper.merged_adapters))


def _put_back_entries(wrapper: LoraLayer | ModulesToSave, entries: tuple) -> None:
    if isinstance(wrapper, ModulesToSave):
        items, wrapper.active_adapter = entries
        wrapper.modules_to_save.clear()
        wrapper.modules_to_save.update(items)
        return
    containers, wrapper.adapters, active, wrapper.merged_adapters = entries
    for attr, items in containers.items():
        getattr(wrapper, attr).clear()
        getattr(wrapper, attr).update(items)
    wrapper.active_adapters = active


class LoraModel(nn.Module):
    """Holds the user's model and the adapters injected into it.

    The adapter registry (`peft_config`: name -> LoraConfig) lives with the user's model, as
    PEFT keeps it (`model.peft_config`): a second LoraModel over a model that already holds
    adapters (a second `get_peft_model` on the same base, as notebooks and rank sweeps do) shares
    that registry, so every wrapper agrees with the layers on which adapters exist. Giving it a
    config under a name that exists replaces that adapter whole (with a warning), as PEFT does.

    Args:
        model: Any torch module; `transformers` models get architecture defaults.
        config: The first adapter's config; None wraps the adapters the model already holds.
        adapter_name: Its name. Default "default".
        low_cpu_mem_usage: Create the factors on the meta device (a file fills them next).
        tensors: The adapter's weights, file-keyed (`adapter_format.read_adapter`): the adapter is loaded
            from them (`add_adapter_from_tensors`). `source` names them in errors.
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.model = model
        registry = shared_registry(model)
        if registry is not None and config is not None:
            warn_user(SECOND_WRAPPER_WARNING)
        self.peft_config: dict[str, LoraConfig] = registry if registry is not None else {}
        self.active_adapter = adapter_name
        if config is not None:
            if adapter_name in self.peft_config:
                self.replace_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, tensors=tensors,
                                     source=source)
            elif tensors is not None:
                self.add_adapter_from_tensors(adapter_name, config, tensors, source=source)
            else:
                self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)  # also makes it active
            if registry is None:  # the model's first adapter: everything else is frozen, as PEFT does
                self._mark_trainable(self.wrappers(), freeze_base=True)
        elif adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r} on this model; adapters: {sorted(self.peft_config)}")
        model.peft_config = self.peft_config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- walking the wrappers ------------------------------------------------------------------

    def _modules_to_wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) in `named_modules` order, without looking inside a LoRA layer (a mixed
        batch walks the model each forward, and each adapter adds two modules to every layer)."""
        seen: set[int] = set()

        def walk(path: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
            if id(module) in seen:
                return
            seen.add(id(module))
            yield path, module
            if not isinstance(module, LoraLayer):
                for name, child in module.named_children():
                    yield from walk(f"{path}.{name}" if path else name, child)

        return walk("", self.model)

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(path, layer) of every LoRA wrapper in the model."""
        for path, module in self._modules_to_wrappers():
            if isinstance(module, LoraLayer):
                yield path, module

    def wrappers(self) -> list[tuple[str, LoraLayer | ModulesToSave]]:
        """(path, wrapper) of every LoRA layer and modules_to_save copy holder in the model."""
        return [(p, m) for p, m in self._modules_to_wrappers() if isinstance(m, (LoraLayer, ModulesToSave))]

    def replace_module(self, path: str, new: nn.Module) -> None:
        """Put `new` at `path` in the user's model (where a wrapper or its base goes)."""
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, new)

    # --- adding and removing -------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Inject a new adapter (not made active). On any error the model is left as it was.

        With `low_cpu_mem_usage` (PEFT's name) the factors are created on the meta device, neither
        allocated nor initialised, for a caller that loads them from a file next
        (`adapter_format.load_weights`). Inits that rewrite the base weight (PiSSA, OLoRA) still run, since
        the file does not hold the residual base.

        Raises:
            ValueError: the name is invalid or taken; the config's variant (e.g. DoRA) does not
                apply to a target's layer type (DoRA: Embedding, Conv, 4-bit; checked on every
                target before any adapter is added); or init_lora_weights is "pissa"/"olora" and
                a target is not a float linear layer of at least rank r (checked on every target
                before any base weight is rewritten).
            TargetError: the config's targets match nothing in the model.
            TypeError: a target is a layer type LoRA cannot wrap.
        """
        self._inject(adapter_name, config, low_cpu_mem_usage)

    def _inject(self, adapter_name: str, config: LoraConfig, low_cpu_mem_usage: bool,
                replacing: str | None = None) -> _Undo:
        """`add_adapter`'s work; returns what undoes it beyond removing the adapter (`_restore`).
        `replacing` names an adapter about to be removed (`replace_adapter`), which does not
        count as sharing a layer."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = self._resolved_config(config)
        targets = select_targets(self.model, config)
        saved = select_modules_to_save(self.model, config)
        stale = [p for p in targets + saved if adapter_name in wrapper_adapters(self.model.get_submodule(p))]
        if stale:
            raise ValueError(f"adapter {adapter_name!r} already exists in {len(stale)} layers (e.g. {stale[0]}) but "
                             "not in this model's registry; remove it (remove_adapter) or pick another name")
        self._check_base_sharing(adapter_name, config, targets, replacing)
        # PiSSA/OLoRA rewrite base weights: keep a copy, so that a failure (here or in a load that
        # follows) can put them back
        undo = self._undo_point(targets if weight_init.rewrites_base_weight(config.init_lora_weights) else [])
        created: list[tuple[str, nn.Module]] = []   # (path, original module) of each wrapper made here
        touched: list[LoraLayer | ModulesToSave] = []  # wrappers the adapter was added to
        try:
            planned, variant = [], choose_variant(config)
            for path in targets:
                layer = self.model.get_submodule(path)
                if not isinstance(layer, LoraLayer):
                    original, layer = layer, dispatch.wrap(layer, config)
                    self.replace_module(path, layer)
                    created.append((path, original))
                spec = AdapterSpec(r=config.rank_for(path), alpha=config.alpha_for(path), dropout=config.lora_dropout,
                                   use_rslora=config.use_rslora, lora_bias=config.lora_bias, variant=variant)
                try:  # before any layer gets the adapter
                    VARIANTS[variant].check(layer)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from None
                planned.append((path, layer, spec))
            if weight_init.rewrites_base_weight(config.init_lora_weights):
                # PiSSA/OLoRA rewrite base weights, which a rollback cannot undo: check every layer first
                for path, layer, spec in planned:
                    try:
                        weight_init.check_layer(layer, spec, config.init_lora_weights)
                    except ValueError as err:
                        raise ValueError(f"{path}: {err}") from None
            skip_init = low_cpu_mem_usage and not weight_init.rewrites_base_weight(config.init_lora_weights)
            for path, layer, spec in planned:
                touched.append(layer)
                layer.add_adapter(adapter_name, spec, init=None if skip_init else config.init_lora_weights)
                follow_mode(layer, layer.base_layer.training)  # new modules follow the model's train/eval mode
            for path in saved:
                module = self.model.get_submodule(path)
                if not isinstance(module, ModulesToSave):
                    original, module = module, ModulesToSave(module)
                    self.replace_module(path, module)
                    created.append((path, original))
                touched.append(module)
                module.add_adapter(adapter_name)
                follow_mode(module, module.original_module.training)
            self.peft_config[adapter_name] = config
            self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        except BaseException:
            # undo exactly what this call did: other adapters (of this or another wrapper) are untouched
            self.peft_config.pop(adapter_name, None)
            for wrapper in touched:
                wrapper.delete_adapter(adapter_name)
            for path, original in reversed(created):
                self.replace_module(path, original)
            self._restore(undo)
            raise
        return undo

    def _check_base_sharing(self, adapter_name: str, config: LoraConfig, targets: list[str],
                            replacing: str | None) -> None:
        """Refuse a PiSSA/OLoRA adapter on a layer another adapter uses, and any adapter on a layer
        whose base a PiSSA/OLoRA adapter rewrote: such an adapter applies to its own residual
        base, so sharing a layer would silently change what the other adapter computes.

        Raises:
            ValueError: naming the layer, the other adapter and the way out (convert to LoRA).
        """
        rewrites = weight_init.rewrites_base_weight(config.init_lora_weights)
        for path in targets:
            layer = self.model.get_submodule(path)
            others = [n for n in wrapper_adapters(layer) if n != replacing]
            residual = [n for n in others if n in self.peft_config
                        and weight_init.rewrites_base_weight(self.peft_config[n].init_lora_weights)]
            if (rewrites and others) or residual:
                owner = f"init_lora_weights={config.init_lora_weights!r}" if rewrites else \
                    f"adapter {residual[0]!r} (init_lora_weights={self.peft_config[residual[0]].init_lora_weights!r})"
                raise ValueError(
                    f"{path}: {owner} replaces this layer's base weight by a residual, which adapter "
                    f"{(others if rewrites else [adapter_name])[0]!r} would then run on; keep PiSSA/OLoRA adapters on "
                    "a base of their own, or convert them to plain LoRA first (lorakit.convert.convert_to_lora, or "
                    "save_pretrained(..., path_initial_model_for_weight_conversion=...))")

    def _undo_point(self, rewritten_paths: list[str]) -> _Undo:
        """What an injection or load may change besides adding its adapter: which adapter each
        wrapper runs, the active adapter, trainable flags, and the base weights at
        `rewritten_paths` (copied: only PiSSA/OLoRA rewrite them)."""
        weights = []
        for path in rewritten_paths:
            module = self.model.get_submodule(path)
            weight = (module.base_layer if isinstance(module, LoraLayer) else module).weight
            weights.append((weight, weight.detach().clone()))
        return _Undo(self.active_adapter, [(w, list(w.active_adapters)) for _, w in self.wrappers()],
                     self.trainable_flags(), weights)

    def _restore(self, undo: _Undo) -> None:
        with torch.no_grad():
            for weight, saved in undo.base_weights:
                weight.copy_(saved)
        for wrapper, names in undo.routing:
            wrapper.set_active(names)
        self.active_adapter = undo.active_adapter
        self.restore_trainable_flags(undo.flags)

    def replace_adapter(self, adapter_name: str, config: LoraConfig, low_cpu_mem_usage: bool = False,
                        tensors: dict[str, torch.Tensor] | None = None, source: str = "") -> None:
        """Replace adapter `adapter_name` by a fresh one with `config` (loaded from `tensors` when
        given), whole, or change nothing. (`get_peft_model` warns with PEFT's words before it
        gets here: "You are trying to modify a model with PEFT for a second time...".)

        The new adapter is injected under a temporary name first (any failure there is rolled
        back exactly and the old adapter was never touched); only then is the old one removed
        from every layer and the new one renamed. What `get_peft_model` does for a name that
        exists (PEFT overwrites such an adapter in place, layer by layer, and may leave the old
        one's layers that the new config does not target).

        Raises:
            KeyError: no such adapter.
            ValueError: it is merged into the base weights; or as for `add_adapter`.
        """
        self.check_exists(adapter_name)
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before replacing it")
        staging = f"{adapter_name}-replacing-{uuid.uuid4().hex[:8]}"
        active = self.active_adapter
        if tensors is not None:
            self.add_adapter_from_tensors(staging, config, tensors, source=source, replacing=adapter_name)
        else:
            self._inject(staging, config, low_cpu_mem_usage, replacing=adapter_name)
        # from here on nothing can fail: drop the old adapter, give the new one its name
        self._remove_everywhere(adapter_name)
        for _, wrapper in self.wrappers():
            if staging in wrapper.adapters:
                wrapper.rename_adapter(staging, adapter_name)
        new_config = self.peft_config.pop(staging)
        renamed = {name: (new_config if name == adapter_name else c) for name, c in self.peft_config.items()}
        self.peft_config.clear()
        self.peft_config.update(renamed)  # the same dict object: other wrappers share it
        self.set_adapter(active if active in self.peft_config else adapter_name)

    def _resolved_config(self, config: LoraConfig) -> LoraConfig:
        """`config` as saved: the base model's name filled in, and target_modules None or "all-linear"
        made concrete (the architecture's default names, or the path of every module adapted), as
        PEFT saves them."""
        changes = {}
        if config.base_model_name_or_path is None:
            changes["base_model_name_or_path"] = base_model_name(self.model)
        targets = config.target_modules
        if targets is None:
            changes["target_modules"] = sorted(resolve_target_modules(self.model, config))
        elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            changes["target_modules"] = select_targets(self.model, config)
        return dataclasses.replace(config, **changes) if changes else config

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's weights from every layer. On any error the model is left as it was.

        Raises:
            KeyError: no such adapter.
            ValueError: it is the active adapter, or merged into the base weights.
        """
        self.check_exists(adapter_name)
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is the active adapter; set_adapter() another one before deleting it")
        merged_in = [p for p, layer in self.lora_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(f"adapter {adapter_name!r} is merged into {len(merged_in)} layers "
                             f"(e.g. {merged_in[0]}); unmerge_adapter() before deleting it")
        with self._rollback():
            self._remove_everywhere(adapter_name)
            del self.peft_config[adapter_name]

    def remove_adapter(self, adapter_name: str) -> None:
        """Remove an adapter even if it is the active or the only one (`delete_adapter` refuses
        those, as PEFT does): another adapter, if any, becomes active; wrappers left without
        adapters are unwrapped, so with none left the model is the plain base again. On any
        error the model is left as it was.

        Raises:
            KeyError: no such adapter.
            ValueError: it is merged into the base weights.
        """
        self.check_exists(adapter_name)
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before removing it")
        with self._rollback():
            self._remove_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            if adapter_name == self.active_adapter and self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def add_adapter_from_tensors(self, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
                                 source: str = "", replacing: str | None = None) -> None:
        """Add an adapter whose weights are already read (`adapter_format.read_adapter`): injected without
        initialisation, filled and checked by `adapter_format.load_weights`; on any error removed again, so
        the model keeps exactly the adapters it had.

        Raises:
            AdapterLoadError: the tensors do not fit (named keys and shapes).
            ValueError, TargetError: as for `add_adapter`.
        """
        undo = self._inject(adapter_name, config, low_cpu_mem_usage=True, replacing=replacing)  # tensors fill the factors
        try:
            adapter_format.load_weights(self, adapter_name, tensors, source=source)
        except BaseException:
            self._remove_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            self._restore(undo)  # the other adapters run as before, PiSSA/OLoRA base weights put back
            raise

    def trainable_flags(self) -> dict[int, bool]:
        """`requires_grad` of every parameter of the model, by identity (see `restore_trainable_flags`)."""
        return {id(p): p.requires_grad for p in self.model.parameters()}

    def restore_trainable_flags(self, flags: dict[int, bool]) -> None:
        """Put back `requires_grad` as `trainable_flags()` recorded it (parameters added since keep theirs)."""
        for p in self.model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])

    @contextlib.contextmanager
    def _rollback(self) -> Iterator[None]:
        """On an error inside the block, put back the adapters every wrapper held, the wrappers
        themselves where the block unwrapped them, the registry, the active adapter and the
        trainable flags (the parameters themselves are the same objects: nothing is copied)."""
        wrappers = self.wrappers()
        held = [(path, wrapper, _adapter_entries(wrapper)) for path, wrapper in wrappers]
        registry, active, flags = dict(self.peft_config), self.active_adapter, self.trainable_flags()
        try:
            yield
        except BaseException:
            for path, wrapper, entries in held:
                self.replace_module(path, wrapper)
                _put_back_entries(wrapper, entries)
            self.peft_config.clear()
            self.peft_config.update(registry)
            self.active_adapter = active
            self.restore_trainable_flags(flags)
            raise

    def _remove_everywhere(self, adapter_name: str) -> None:
        """Drop an adapter from every wrapper and unwrap wrappers left with none (callers that
        must leave the model as it was on an error wrap this in `_rollback`)."""
        for path, wrapper in self.wrappers():
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapters:
                self.replace_module(path, wrapper.base_layer if isinstance(wrapper, LoraLayer) else wrapper.original_module)

    def check_exists(self, adapter_name: str) -> None:
        """Raise KeyError (naming the adapters there are) unless `adapter_name` exists."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, density: float | None = None) -> None:
        """Add adapter `adapter_name` combining `adapters` with `weights` (PEFT's method and maths).

        "cat" (rank = sum of the ranks) gives exactly ΔW = Σ w_i ΔW_i; "svd" its best rank-`svd_rank`
        approximation; "linear" (equal ranks only) sums the factors themselves, a rough
        approximation. See `lorakit.combine.add_weighted_adapter` for the maths, arguments and errors.
        """
        from .combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, density=density)

    # --- which adapter runs, which parameters train --------------------------------------------

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one that runs in forward and whose parameters train.

        Raises:
            KeyError: no such adapter.
        """
        self.check_exists(adapter_name)
        wrappers = self.wrappers()
        merged = any(isinstance(w, LoraLayer) and w.merged_adapters for _, w in wrappers)
        if merged and adapter_name != self.active_adapter:
            warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for _, wrapper in wrappers:
            wrapper.set_active([adapter_name])
        self._mark_trainable(wrappers)

    def _mark_trainable(self, wrappers: list[tuple[str, LoraLayer | ModulesToSave]], freeze_base: bool = False) -> None:
        """Only the active adapter's parameters train (unless it is inference-only), as in PEFT.

        With `freeze_base` (a model's first injection) every base parameter is frozen first; later
        calls (another adapter added or made active) leave the base parameters' flags as they are,
        so one a user unfroze by hand stays trainable, as PEFT leaves it.
        """
        if freeze_base:
            for p in self.model.parameters():
                p.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        trains = config is not None and not config.inference_mode
        for _, wrapper in wrappers:
            for name in wrapper.adapters:
                for p in wrapper.adapter_parameters(name):
                    p.requires_grad_(trains and name == self.active_adapter)
        if not trains:
            return
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias") and not (adapter_format.is_adapter_tensor(name)
                                                  or adapter_format.is_frozen_original(name)):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for _, wrapper in wrappers:
                bias = getattr(wrapper.base_layer, "bias", None) if isinstance(wrapper, LoraLayer) else None
                if bias is not None and self.active_adapter in wrapper.adapters:
                    bias.requires_grad_(True)

    # --- merging ---------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return any(layer.merged_adapters for _, layer in self.lora_layers())

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active one) into the base weights, in float32. On any error
        every weight is put back bit for bit (see `_merge_layers` for the memory this takes).

        Args:
            adapter_names: Adapters to merge. Default: the active adapter.
            safe_merge: Check every merged weight for NaN/inf before changing any.

        Raises:
            KeyError: an unknown adapter name.
            ValueError: with safe_merge, a merged weight would hold NaN or inf (nothing merged).
            QuantizedMergeError: an adapter is on a quantized base layer (nothing merged); for
                lorakit's 4-bit layers use `merge_and_unload`, which dequantizes.
        """
        self._merge(adapter_names, safe_merge)

    def _merge(self, adapter_names: list[str] | None, safe_merge: bool, skip: set[str] = frozenset()) -> list[_MergeUndo]:
        """`merge_adapter`'s work, on every LoRA layer but those at the paths in `skip`; returns
        what `_undo_merges` needs to take it back."""
        names = adapter_names or [self.active_adapter]
        for name in names:
            self.check_exists(name)
        layers = [(path, layer) for path, layer in self.lora_layers() if path not in skip]
        refused = [(path, layer) for path, layer in layers
                   if not layer.mergeable and any(n in layer.adapters for n in names)]
        if refused:
            path, layer = refused[0]
            raise QuantizedMergeError(f"{layer.merge_refusal} ({len(refused)} layers, e.g. {path}; nothing was merged)")
        if safe_merge:
            check_finite_merge(layers, names)
        return self._merge_layers(layers, names)

    def _merge_layers(self, layers: list[tuple[str, LoraLayer]], names: list[str]) -> list[_MergeUndo]:
        """Merge `names` into each layer holding them; on an error every layer merged so far is put
        back bit for bit (`_undo_merges`) before it propagates. Each layer's weight (and bias) is
        copied to CPU memory before it is merged into, so a merge holds a CPU copy of the merged
        layers' weights until it is done (accelerator memory is not used for it).

        Returns:
            What `_undo_merges` needs to take this merge back exactly.
        """
        saved: list[_MergeUndo] = []
        try:
            for _, layer in layers:
                todo = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
                if not todo:
                    continue
                tensors = [t for t in (layer.base_weight, getattr(layer.base_layer, "bias", None)) if t is not None]
                saved.append((layer, [(t, t.detach().to("cpu", copy=True)) for t in tensors], list(layer.merged_adapters)))
                layer.merge(todo)
        except BaseException:
            self._undo_merges(saved)
            raise
        return saved

    @staticmethod
    def _undo_merges(saved: list[_MergeUndo]) -> None:
        with torch.no_grad():
            for layer, tensors, merged in reversed(saved):
                for tensor, copy in tensors:
                    tensor.copy_(copy)
                layer.restore_merge_state(merged)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         dtype: torch.dtype | str | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model, with no wrapper left. On any
        error the model is left as it was: unmerged, wrapped, and quantized where it was.

        On a quantized base (4-bit layers) every 4-bit layer is dequantized, ΔW added in float32
        and the result stored as an `nn.Linear` (the format's `dequantized_layers`, for NF4
        `lorakit.quant.lora.dequantized_layers`).

        Args:
            safe_merge: Check every merged weight for NaN/inf before changing any.
            adapter_names: Adapters to merge. Default: the active adapter.
            dtype: dtype of the returned model. None (default): unchanged for a float base,
                bfloat16 for a quantized one. "original" (quantized base): each dequantized
                layer gets its pre-quantization dtype. A torch dtype: the model is cast to it.

        Raises:
            KeyError: an unknown adapter name.
            ValueError: with safe_merge, a merged weight would hold NaN or inf (nothing merged).
        """
        names = adapter_names or [self.active_adapter]
        for name in names:
            self.check_exists(name)
        quantizer = model_quantizer(self.model)
        # every 4-bit layer dequantized (adapters merged in float32), none put in yet
        dequantized = {} if quantizer is None else quantizer.dequantized_layers(self, names, safe_merge, dtype)
        replaced = {path: self.model.get_submodule(path) for path in dequantized}
        merged = self._merge(names, safe_merge, skip=set(dequantized))
        try:
            for path, linear in dequantized.items():
                self.replace_module(path, linear)
            model = self.unload()
        except BaseException:  # the model as it was: unmerged, wrapped, quantized
            for path, module in replaced.items():
                self.replace_module(path, module)
            self._undo_merges(merged)
            raise
        if quantizer is not None and dtype != "original":
            dtype = torch.bfloat16 if dtype is None else dtype
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model

    def unload(self) -> nn.Module:
        """Return the plain model: LoRA wrappers replaced by their base layers (merged weights
        kept), modules_to_save by the active adapter's trained copy. On any error every wrapper
        is put back."""
        with self._rollback():  # every wrapper back in place if one fails
            for path, wrapper in self.wrappers():
                if isinstance(wrapper, LoraLayer):
                    self.replace_module(path, wrapper.base_layer)
                else:
                    active = wrapper.active_adapter
                    self.replace_module(path, wrapper.modules_to_save[active] if active else wrapper.original_module)
        self.peft_config.clear()
        self.model.__dict__.pop("peft_config", None)  # the plain model again, as PEFT leaves it
        return self.model

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, row i of every batch runs adapter `adapter_names[i]`.

        `BASE_ADAPTER` ("__base__") means no adapter for that row.

        Raises:
            KeyError: an unknown adapter name.
            ValueError: an adapter is merged (its rows could not be told apart).
        """
        if not adapter_names:
            raise ValueError("adapter_names is empty")
        for name in set(adapter_names) - {BASE_ADAPTER}:
            self.check_exists(name)
        if self.merged:
            raise ValueError("adapter_names cannot be used while an adapter is merged; unmerge_adapter() first")
        routing = AdapterRouting(adapter_names)
        wrappers = self.wrappers()
        for _, wrapper in wrappers:
            wrapper.routing = routing
        try:
            yield
        finally:
            for _, wrapper in wrappers:
                wrapper.routing = None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are taken out and put back)."""
        merged = {path: list(layer.merged_adapters) for path, layer in self.lora_layers() if layer.merged_adapters}
        self.unmerge_adapter()
        wrappers = self.wrappers()
        for _, wrapper in wrappers:
            wrapper.disabled = True
        try:
            yield
        finally:
            for _, wrapper in wrappers:
                wrapper.disabled = False
            for path, names in merged.items():
                self.model.get_submodule(path).merge(names)
