"""Adapters on a model: injection, switching, merging, unloading, counting.

    peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))

`PeftModel` (what users hold) -> `.base_model`: `LoraModel` (owns the adapters) -> `.model`: the
user's model, whose target layers are replaced in place by LoRA wrappers. Module paths are
PEFT's, so parameter names are `base_model.model.<path>.lora_A.<adapter>.weight`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import dispatch, io
from .config import LoraConfig
from .layers import BASE_ADAPTER, AdapterRouting, AdapterSpec, LoraLayer, ModulesToSave
from .layers import init as weight_init
from .targeting import select_modules_to_save, select_targets
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: str) -> None:
    """Adapter names are plain names: letters, digits, '_' and '-'.

    Raises:
        ValueError: the name is empty, reserved, or holds any other character ('.', '/', ...).
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ADAPTER:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' and '-' "
                         f"(and not the reserved {BASE_ADAPTER!r})")


def check_finite_merge(layers: list[tuple[str, LoraLayer]], names: list[str]) -> None:
    """safe_merge's check, before any weight changes: every merged weight must be finite.

    Raises:
        ValueError: naming the first layer whose merge would hold NaN or inf.
    """
    for path, layer in layers:
        present = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
        if present and not torch.isfinite(layer.merged_weight(present)).all():
            raise ValueError(f"safe_merge: merging {present} into {path} gives NaN or inf; nothing was merged")


class LoraModel(nn.Module):
    """Holds the user's model and the adapters injected into it.

    Args:
        model: Any torch module; `transformers` models get architecture defaults.
        config: The first adapter's config.
        adapter_name: Its name. Default "default".
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)  # also makes it active

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

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(path, layer) of every LoRA wrapper in the model."""
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield path, module

    def _wrappers(self) -> list[tuple[str, LoraLayer | ModulesToSave]]:
        return [(p, m) for p, m in self.model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, new)

    # --- adding and removing -------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Inject a new adapter (not made active). On any error the model is left as it was.

        With `low_cpu_mem_usage` (PEFT's name) the factors are created on the meta device, neither
        allocated nor initialised, for a caller that loads them from a file next
        (`io.load_weights`). Inits that rewrite the base weight (PiSSA, OLoRA) still run, since
        the file does not hold the residual base.

        Raises:
            ValueError: the name is invalid or taken; use_dora with a target whose layer type
                does not implement DoRA (Embedding, Conv, 4-bit; checked on every target before
                any adapter is added); or init_lora_weights is "pissa"/"olora" and
                a target is not a float linear layer of at least rank r (checked on every target
                before any base weight is rewritten).
            TargetError: the config's targets match nothing in the model.
            TypeError: a target is a layer type LoRA cannot wrap.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if config.base_model_name_or_path is None:
            name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            config = dataclasses.replace(config, base_model_name_or_path=name_or_path)
        targets = select_targets(self.model, config)
        saved = select_modules_to_save(self.model, config)
        try:
            planned = []
            for path in targets:
                layer = self.model.get_submodule(path)
                if not isinstance(layer, LoraLayer):
                    layer = dispatch.wrap(layer, config)
                    self._replace(path, layer)
                spec = AdapterSpec(r=config.rank_for(path), alpha=config.alpha_for(path), dropout=config.lora_dropout,
                                   use_rslora=config.use_rslora, lora_bias=config.lora_bias,
                                   use_dora=config.use_dora)
                if spec.use_dora:  # before any layer gets the adapter
                    try:
                        layer.check_dora()
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
                layer.add_adapter(adapter_name, spec, init=None if skip_init else config.init_lora_weights)
                layer.train(layer.base_layer.training)  # new modules follow the model's train/eval mode
            for path in saved:
                module = self.model.get_submodule(path)
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    self._replace(path, module)
                module.add_adapter(adapter_name)
                module.train(module.original_module.training)
        except Exception:
            self._remove_everywhere(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's weights from every layer.

        Raises:
            KeyError: no such adapter.
            ValueError: it is the active adapter, or merged into the base weights.
        """
        self._check_exists(adapter_name)
        if adapter_name == self.active_adapter:
            raise ValueError(f"adapter {adapter_name!r} is the active adapter; set_adapter() another one before deleting it")
        merged_in = [p for p, layer in self.lora_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(f"adapter {adapter_name!r} is merged into {len(merged_in)} layers "
                             f"(e.g. {merged_in[0]}); unmerge_adapter() before deleting it")
        self._remove_everywhere(adapter_name)
        del self.peft_config[adapter_name]

    def remove_adapter(self, adapter_name: str) -> None:
        """Remove an adapter even if it is the active or the only one (`delete_adapter` refuses
        those, as PEFT does): another adapter, if any, becomes active; wrappers left without
        adapters are unwrapped, so with none left the model is the plain base again.

        Raises:
            KeyError: no such adapter.
            ValueError: it is merged into the base weights.
        """
        self._check_exists(adapter_name)
        if any(adapter_name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before removing it")
        self._remove_everywhere(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def add_adapter_from_tensors(self, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
                                 source: str = "") -> None:
        """Add an adapter whose weights are already read (`io.read_adapter`): injected without
        initialisation, filled and checked by `io.load_weights`; on any error removed again, so
        the model keeps exactly the adapters it had.

        Raises:
            AdapterLoadError: the tensors do not fit (named keys and shapes).
            ValueError, TargetError: as for `add_adapter`.
        """
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=True)  # the tensors fill the factors
        try:
            io.load_weights(self, adapter_name, tensors, source=source)
        except Exception:
            self._remove_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            raise

    def _remove_everywhere(self, adapter_name: str) -> None:
        """Drop an adapter from every wrapper and unwrap wrappers left with none (rollback-safe)."""
        for path, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapters:
                self._replace(path, wrapper.base_layer if isinstance(wrapper, LoraLayer) else wrapper.original_module)

    def _check_exists(self, adapter_name: str) -> None:
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
        self._check_exists(adapter_name)
        wrappers = self._wrappers()
        merged = any(isinstance(w, LoraLayer) and w.merged_adapters for _, w in wrappers)
        if merged and adapter_name != self.active_adapter:
            warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for _, wrapper in wrappers:
            wrapper.set_active([adapter_name])
        self._mark_trainable(wrappers)

    def _mark_trainable(self, wrappers: list[tuple[str, LoraLayer | ModulesToSave]]) -> None:
        """Freeze everything, then unfreeze the active adapter (unless it is inference-only)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        if config is None or config.inference_mode:
            return
        for _, wrapper in wrappers:
            for p in wrapper.adapter_parameters(self.active_adapter):
                p.requires_grad_(True)
        if config.bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias") and not re.search(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|original_module)\.", name):
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
        """Fold adapters (default: the active one) into the base weights, in float32.

        Args:
            adapter_names: Adapters to merge. Default: the active adapter.
            safe_merge: Check every merged weight for NaN/inf before changing any.

        Raises:
            KeyError: an unknown adapter name.
            ValueError: with safe_merge, a merged weight would hold NaN or inf (nothing merged).
            QuantizedMergeError: an adapter is on a 4-bit base layer (nothing merged); use
                `merge_and_unload`, which dequantizes.
        """
        names = adapter_names or [self.active_adapter]
        for name in names:
            self._check_exists(name)
        layers = list(self.lora_layers())
        refused = [path for path, layer in layers
                   if not getattr(layer, "mergeable", True) and any(n in layer.adapters for n in names)]
        if refused:
            from .quant.lora import MERGE_REFUSAL, QuantizedMergeError

            raise QuantizedMergeError(f"{MERGE_REFUSAL} ({len(refused)} layers, e.g. {refused[0]}; nothing was merged)")
        if safe_merge:
            check_finite_merge(layers, names)
        for _, layer in layers:
            layer.merge([n for n in names if n in layer.adapters])

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         dtype: torch.dtype | str | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model, with no wrapper left.

        On a quantized base (4-bit layers) every 4-bit layer is dequantized, ΔW added in float32
        and the result stored as an `nn.Linear` (see `lorakit.quant.lora.merge_and_dequantize`).

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
        from .quant.lora import has_quantized_layers, merge_and_dequantize

        if has_quantized_layers(self.model):
            return merge_and_dequantize(self, adapter_names, safe_merge=safe_merge, dtype=dtype)
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        model = self.unload()
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model

    def unload(self) -> nn.Module:
        """Return the plain model: LoRA wrappers replaced by their base layers (merged weights
        kept), modules_to_save by the active adapter's trained copy."""
        for path, wrapper in self._wrappers():
            if isinstance(wrapper, LoraLayer):
                self._replace(path, wrapper.base_layer)
            else:
                active = wrapper.active_adapter
                self._replace(path, wrapper.modules_to_save[active] if active else wrapper.original_module)
        self.peft_config.clear()
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
            self._check_exists(name)
        if self.merged:
            raise ValueError("adapter_names cannot be used while an adapter is merged; unmerge_adapter() first")
        routing = AdapterRouting(adapter_names)
        wrappers = self._wrappers()
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
        wrappers = self._wrappers()
        for _, wrapper in wrappers:
            wrapper.disabled = True
        try:
            yield
        finally:
            for _, wrapper in wrappers:
                wrapper.disabled = False
            for path, names in merged.items():
                self.model.get_submodule(path).merge(names)


class PeftModel(nn.Module):
    """The model users hold: a `LoraModel` plus files, counting and generation.

    Methods of `LoraModel` (merge_adapter, unmerge_adapter, merge_and_unload, unload,
    disable_adapter, set_adapter, delete_adapter, add_weighted_adapter, lora_layers) and
    attributes of the user's model (config, ...) are reached through this object too.

    Args:
        model: The base model.
        peft_config: The first adapter's config.
        adapter_name: Its name. Default "default".
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward; `adapter_names` (one per row, or "__base__") mixes adapters in a batch."""
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        self._check_batch(adapter_names, args, kwargs)
        with self.base_model.mixed_batch(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """transformers' generate; `adapter_names` as in forward."""
        if adapter_names is None:
            return self.base_model.model.generate(*args, **kwargs)
        self._check_batch(adapter_names, args, kwargs)
        with self.base_model.mixed_batch(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    @staticmethod
    def _check_batch(adapter_names: list[str], args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(first, torch.Tensor) and first.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {first.shape[0]} rows")

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new, inactive adapter (see `LoraModel.add_adapter`)."""
        self.base_model.add_adapter(adapter_name, peft_config)

    # --- counting ------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; works on a meta-device model.

        4-bit layers count their weight's logical size (in_features * out_features), as PEFT
        counts bitsandbytes' packed weights.
        """
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        for module in self.modules():
            total += getattr(module, "quantized_numel", 0)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- files -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion: str | None = None) -> None:
        """Write each adapter as PEFT does: "default" in `save_directory`, others in a subfolder.

        Each file is written to a temporary name and renamed, so a crash leaves either the old
        file or the new one.

        Args:
            save_directory: Folder to write into (created if missing).
            selected_adapters: Adapters to write. Default: all.
            path_initial_model_for_weight_conversion: For an adapter trained from a PiSSA/OLoRA
                init: the folder where that adapter was saved right after `get_peft_model`, before
                training. Each selected adapter is then written converted to a plain LoRA adapter
                for the ORIGINAL base (rank 2r: A' = [A; A0], B' = [B, -B0], PEFT's conversion; see
                `lorakit.convert`). The initial folder is only read (PEFT also rewrites its config).

        Raises:
            KeyError: an unknown adapter name.
            ValueError: an adapter holds NaN or inf (nothing written for it).
            AdapterLoadError, ConversionError: with path_initial_model_for_weight_conversion, the
                initial adapter is unreadable or does not match the trained one.
        """
        names = selected_adapters or list(self.peft_config)
        for name in names:
            self.base_model._check_exists(name)
        if path_initial_model_for_weight_conversion is None:
            for name in names:
                io.save_adapter(self.base_model, save_directory, name)
            return
        from .convert import converted_adapter

        initial = io.read_adapter(path_initial_model_for_weight_conversion)
        for name in names:
            config, tensors = converted_adapter(self.peft_config[name], io.adapter_tensors(self.base_model, name),
                                                *initial, source=str(path_initial_model_for_weight_conversion))
            io.write_adapter(io.adapter_dir(save_directory, name), config, tensors, what=f"adapter {name!r}")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False) -> PeftModel:
        """Load an adapter directory onto `model`.

        Args:
            model: The base model (modified in place: its target layers are wrapped).
            model_id: Directory holding adapter_config.json and adapter_model.safetensors.
            adapter_name: Name to give the adapter. Default "default".
            is_trainable: Keep the adapter trainable; otherwise it is frozen (inference mode).
            allow_pickle: Accept a pickled adapter_model.bin (loaded with weights_only=True).

        Raises:
            AdapterLoadError: the files are missing, malformed, or do not fit the model; the
                model is then left exactly as it was.
        """
        config, tensors = io.read_adapter(model_id, allow_pickle=allow_pickle)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        peft_model = cls(model, config, adapter_name, low_cpu_mem_usage=True)  # the file fills the factors
        try:
            io.load_weights(peft_model.base_model, adapter_name, tensors, source=model_id)
        except Exception:
            peft_model.base_model.remove_adapter(adapter_name)  # unwrap: the model is as it was
            raise
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False) -> None:
        """Load another adapter directory under `adapter_name` (not made active).

        Raises:
            AdapterLoadError: as for `from_pretrained`; the model keeps its other adapters as they were.
            ValueError: the name is invalid or taken.
        """
        config, tensors = io.read_adapter(model_id, allow_pickle=allow_pickle)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        self.base_model.add_adapter_from_tensors(adapter_name, config, tensors, source=model_id)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   quantize: str | None = None, double_quant: bool = False,
                   compute_dtype: torch.dtype | None = None) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter: target layers wrapped, everything else frozen.

        peft_model = get_peft_model(base, config, quantize="nf4")   # QLoRA

    Args:
        model: The base model (modified in place).
        peft_config: The adapter's config.
        adapter_name: Its name. Default "default".
        quantize: "nf4" first replaces every `nn.Linear` except the output head (and modules
            trained in full) by a frozen 4-bit `lorakit.quant.Linear4bit`. Default None.
        double_quant: With `quantize`, 8-bit quantize the NF4 scales too. Default False.
        compute_dtype: With `quantize`, the 4-bit layers' matmul dtype; None (default) uses
            each input's dtype.

    Raises:
        ConfigError, TargetError, TypeError: see `LoraConfig` and `LoraModel.add_adapter`
            (a TargetError is raised before anything is quantized).
        ValueError: an unknown `quantize` method.
    """
    if quantize is not None:
        from .quant.lora import quantize_for_lora

        quantize_for_lora(model, peft_config, quantize, double_quant=double_quant, compute_dtype=compute_dtype)
    return PeftModel(model, peft_config, adapter_name)
