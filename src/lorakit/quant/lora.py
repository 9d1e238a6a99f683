"""LoRA on the frozen 4-bit linear layer (QLoRA), and turning a quantized model back into floats.

    y = Linear4bit(x) + scaling · B(A(dropout(x)))      x: (..., in), A: (r, in), B: (out, r)

`lorakit.quant` registers the "nf4" format (`registry.QUANTIZERS`) with `Linear4bitLora` as its
wrapper, so `get_peft_model` wraps a `Linear4bit` exactly as an `nn.Linear`: same factor names, shapes, init and
file keys, hence an adapter trained on a 4-bit base is an ordinary adapter that loads on the
float base too (and in PEFT).

Merging (decided): a LoRA update is NOT merged into the 4-bit weight. Requantizing W + ΔW
rounds it back onto the NF4 grid, whose steps (about absmax / 10 of a block) dwarf a typical
ΔW: for a random rank-16 ΔW with |ΔW| = 1% of |W| about 2% of the update survives (27% at
5%), so the merged model would lose most of what was trained, and unmerging could not
restore the original codes. `merge_adapter` therefore
raises `QuantizedMergeError` on a 4-bit layer (before any layer is changed), and
`merge_and_unload` takes the dequantizing path (`dequantized_layers`): every 4-bit layer
is dequantized, ΔW added in float32, and the result stored as a 16-bit `nn.Linear`.
`unmerge` stays consistent trivially: nothing is ever merged into a 4-bit base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import Linear, LoraLayer
from lorakit.layers.base import QuantizedMergeError
from lorakit.quant import registry
from lorakit.quant.linear4bit import Linear4bit

if TYPE_CHECKING:
    from lorakit.model import LoraModel

__all__ = [
    "Linear4bitLora",
    "QuantizedMergeError",
    "dequantize_linear",
    "has_quantized_layers",
    "dequantized_layers",
    "quantize_for_lora",
]


DtypeChoice = torch.dtype | Literal["original"] | None


MERGE_REFUSAL = (
    "LoRA adapters are not merged into 4-bit (NF4) base weights: requantizing W + ΔW would lose most "
    "of the update. Use merge_and_unload(), which dequantizes the base, merges in float32 and returns "
    "a 16-bit model, or keep the adapter unmerged"
)


class Linear4bitLora(Linear):
    """LoRA wrapper for a frozen `Linear4bit`: the 4-bit base plus float LoRA factors.

    The factors are float32 `nn.Linear`s of shapes (r, in) and (out, r), as for a float base,
    and the forward is `Linear`'s: it calls `base_layer(x)` and adds the LoRA path, never
    reading a float base weight. `mergeable` is False: `LoraModel.merge_adapter` checks it on
    every layer before merging anything.

    Args:
        base_layer: The frozen 4-bit layer.
    """

    mergeable = False
    merge_refusal = MERGE_REFUSAL

    def __init__(self, base_layer: Linear4bit) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def merged_weight(self, names: list[str], commit: bool = False) -> torch.Tensor:
        """Dequantized base weight with the adapters folded in by their variants, in float32
        (nothing written back: a 4-bit layer never merges in place).

        Returns:
            Tensor of shape (out_features, in_features), float32.
        """
        base = self.base_layer.dequantize(torch.float32)  # (out, in)
        weight = base
        for name in names:
            weight = self.variant(name).merge(self, name, weight, lambda: base, commit)
        return weight

    def merge(self, names: list[str]) -> None:
        """Refused for a 4-bit base (see the module docstring).

        Raises:
            QuantizedMergeError: any of `names` is not merged already (none ever is).
        """
        if [n for n in names if n not in self.merged_adapters]:
            raise QuantizedMergeError(MERGE_REFUSAL)


# --- quantizing a model for LoRA ---------------------------------------------------------------

def quantize_for_lora(
    model: nn.Module,
    config: LoraConfig,
    method: str = "nf4",
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Quantize every `nn.Linear` of `model` that LoRA training leaves frozen, in place.

    Kept in float: the output head (`get_output_embeddings()`, and any layer named `lm_head`),
    and every Linear inside a module that `config` trains in full (`modules_to_save`, the
    classifier head of a SEQ_CLS task). The targets are checked first, so a config that
    matches nothing raises before the model is touched.

    Args:
        model: The float model (e.g. a transformers causal LM in float32 or bf16).
        config: The adapter's config.
        method: A format of `lorakit.quant.registry.QUANTIZERS`. Default "nf4".
        double_quant: 8-bit quantize the NF4 scales (about 0.37 fewer bits per weight).
            Default False.
        compute_dtype: dtype of the 4-bit layers' matmuls; None (default) uses each input's dtype.
        blocksize: NF4 block size. Default 64.

    Returns:
        `model` itself, modified.

    Raises:
        ValueError: an unknown `method`.
        TargetError: the config's targets match nothing (model unchanged).
    """
    from lorakit.targeting import output_head_path, select_modules_to_save, select_targets

    quantizer = registry.get(method)  # an unknown name raises before anything changes
    select_targets(model, config)  # raises before anything is quantized
    kept = set(select_modules_to_save(model, config))
    head = output_head_path(model)
    if head:
        kept.add(head)
    skip = {"lm_head"} | {
        path for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(path == k or path.startswith(k + ".") for k in kept)
    }
    return quantizer.quantize_model(model, skip=skip, blocksize=blocksize, double_quant=double_quant,
                                    compute_dtype=compute_dtype)


# --- back to floats ----------------------------------------------------------------------------

def has_quantized_layers(model: nn.Module) -> bool:
    """Whether `model` holds any quantized layer of a registered format (wrapped by LoRA or not)."""
    return registry.model_quantizer(model) is not None


def _target_dtype(layer: Linear4bit, dtype: DtypeChoice) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    return layer.orig_dtype if dtype == "original" else dtype


def dequantize_linear(layer: Linear4bit, dtype: DtypeChoice = None, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> nn.Linear:
    """A float `nn.Linear` with the 4-bit layer's (or a given) weight and bias.

    Args:
        layer: The 4-bit layer (not modified).
        dtype: dtype of the new layer: None (default) bfloat16, "original" the dtype the weight
            had before quantization, or a torch dtype.
        weight: float32 weight of shape (out_features, in_features) to use instead of the
            dequantized one (e.g. with ΔW added). Default: `layer.dequantize()`.
        bias: float32 bias of shape (out_features,) to use instead of the layer's.

    Returns:
        A plain `nn.Linear` on the layer's device, parameters frozen (as in an unloaded model).
    """
    dtype = _target_dtype(layer, dtype)
    weight = layer.dequantize(torch.float32) if weight is None else weight  # (out, in)
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach().float()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return linear


def _merged_bias(layer: Linear4bitLora, names: list[str]) -> torch.Tensor | None:
    """float32 base bias plus the scaled lora_B biases of `names`, shape (out,), or None."""
    base = layer.base_layer.bias
    bias = None if base is None else base.detach().float()
    for name in names:
        spec = layer.adapters[name]
        if spec.lora_bias:
            if bias is None:
                raise ValueError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge into")
            bias = bias + spec.scaling * layer.lora_B[name].bias.detach().float()
    return bias


def dequantized_layers(lora_model: LoraModel, names: list[str], safe_merge: bool = False,
                       dtype: DtypeChoice = None) -> dict[str, nn.Linear]:
    """The float layers that replace a model's 4-bit ones in `merge_and_unload`, computed without
    changing the model.

    Every 4-bit layer is dequantized; where it carries adapters `names` their ΔW (and lora_B
    bias) is added in float32; the result is an `nn.Linear` of `dtype`. Float LoRA layers are
    not included: `LoraModel.merge_and_unload` merges them (with its rollback) and puts these in.

    Args:
        lora_model: The LoraModel (not modified).
        names: Adapters to merge (checked to exist by the caller).
        safe_merge: Check every merged weight for NaN/inf.
        dtype: "original": each layer gets the dtype its weight had before quantization;
            otherwise as `dequantize_linear` (the caller casts the whole model afterwards).

    Returns:
        Module path -> its replacement, for every 4-bit layer, wrapped by LoRA (the wrapper's
        path) or not.

    Raises:
        ValueError: with safe_merge, a merged weight would hold NaN or inf.
    """
    model = lora_model.model
    replacements: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if path.endswith(".base_layer") and isinstance(model.get_submodule(path[: -len(".base_layer")]), LoraLayer):
            continue  # handled with its wrapper
        if isinstance(module, Linear4bitLora):
            present = [n for n in names if n in module.adapters]
            weight = module.merged_weight(present)  # (out, in) float32
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"safe_merge: merging {present} into {path} gives NaN or inf; nothing was merged")
            replacements[path] = dequantize_linear(module.base_layer, dtype, weight, _merged_bias(module, present))
        elif isinstance(module, Linear4bit):
            replacements[path] = dequantize_linear(module, dtype)
    return replacements
