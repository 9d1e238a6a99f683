"""DoRA (weight-decomposed LoRA) on linear layers: the variant, its magnitude, the maths, the training path.

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) writes the adapted weight as a
trainable magnitude times a direction that LoRA updates:

    W' = m ⊙ (W + ΔW) / n,    n = ||W + ΔW||_row (detached)       W: (out, in), ΔW = s · B A, m: (out,)

||·||_row is the L2 norm of each output row (PEFT: `torch.linalg.norm(W + ΔW, dim=1)`). As in the
paper (section 4.3) and PEFT, n is treated as a constant: it is recomputed every forward from
the current A and B but receives no gradient. With scale = m / n (out,) a layer computes, as
PEFT 0.21.2's `DoraLinearLayer.forward` (and the paper's code) does:

    y = scale ⊙ v + b,             v = x W^T + s · (x A^T) B^T         (dropout 0, or eval)
    y = base(x) + scale ⊙ v - x̃ W^T, v = x̃ W^T + s · (x̃ A^T) B^T        (training with dropout: x̃ = drop(x))

i.e. PEFT's `base + (scale - 1) ⊙ (base - b) + scale ⊙ lora`. Without dropout the base output
is reused; with dropout the rescaled base part reads the dropped input, which costs one more
base-sized product forward and one more backward (PEFT and the paper's code pay it too).

m starts as n of the freshly initialised adapter (||W|| row-wise when B = 0), so a new DoRA
adapter computes what the base computes. It is saved as PEFT saves it: shape (out,), file key
`<module>.lora_magnitude_vector` (PEFT drops the ".weight" of its parameter
`<module>.lora_magnitude_vector.<adapter>.weight`).

Merging folds the whole layer: W' = (m / n) ⊙ (W + ΔW) with n taken from the unmerged base
weight; unmerging divides it back out with the n stored at merge time (PEFT's maths).

`DoraVariant` is how layers reach all of this (`layers.variant`): a config with `use_dora=True`
selects it, it refuses layers without a 2-D float base weight (Embedding, Conv, 4-bit), and it
owns the magnitude container, the forward and the merge.

Two forwards compute these formulas:

* `dora_delta` (plain autograd ops): the reference, also used by mixed-adapter batches, autocast
  and the "plain" LoRA path; it returns the update to add to the layer's output so far;
* `dora_linear` / `DoraLinearFunction`: the default path. n is computed once per forward (one
  (out, in) temporary, no graph); the base output is reused, or, for a frozen nn.Linear, the
  base product runs inside the Function as for plain LoRA (`layers.autograd`); backward keeps
  one (N, out) tensor (v, for dm = Σ_N g ⊙ v / n) beside h = x̃ A^T (N, r), rebuilds the input
  from what the base graph keeps when it can (`autograd.find_recipe`) and regenerates dropout
  positions from a seed.

Cost (benchmarks/dora.py, docs/benchmarks.md): over plain LoRA, per layer and step, the norm
(one (out, in) product and reduction), y = scale ⊙ v and dm's product over (N, out); with
dropout also the base product of x̃ and its backward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import autograd
from .linear import Linear
from .variant import LoraVariant


class DoraMagnitude(nn.Module):
    """One adapter's DoRA magnitude in one layer: `lora_magnitude_vector.<adapter>` (PEFT's name).

    Args:
        out_features: Size of the layer's output.
        device: Where the parameter lives.
        dtype: Its dtype (the adapter's: float32, float64 for a float64 base).

    Attributes:
        weight: m, shape (out_features,), trainable. Set by `LoraLayer.add_adapter` to the
            weight norm of the initialised adapter (uninitialised on the meta device).
        merged_norm: n used when this adapter was merged, (out_features,), for unmerging; None
            while unmerged. Not part of the state dict.
    """

    def __init__(self, out_features: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.merged_norm: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


# --- the maths ------------------------------------------------------------------------------------

def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """n = ||W + scaling · B A||_row, detached, in the factors' dtype.

    W + ΔW is formed once, by one fused product (W + s · B A), and reduced row by row.

    Args:
        weight: W as (out, in) (a transposed view for GPT-2's Conv1D), any float dtype.
        a: lora_A's weight, (r, in).
        b: lora_B's weight, (out, r).
        scaling: s.

    Returns:
        (out,) in a's dtype, without grad.
    """
    with torch.no_grad():
        if weight.dtype == a.dtype:
            combined = torch.addmm(weight, b, a, alpha=scaling)  # (out, in), one new tensor
        else:  # e.g. a bf16 base under float32 factors: norm in the factors' dtype
            combined = weight.to(a.dtype, copy=True).addmm_(b, a, alpha=scaling)  # (out, in)
        return torch.linalg.vector_norm(combined, dim=1)  # (out,)


def merge_weight(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """factor ⊙ (W + ΔW), row-wise over the output dimension, in W's layout.

    Args:
        weight: W, (out, in), or (in, out) when `fan_in_fan_out`.
        delta: ΔW in the same layout.
        factor: m / n, (out,).
        fan_in_fan_out: W is stored (in, out) (GPT-2's Conv1D).
    """
    return (weight + delta) * (factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1))


def unmerge_weight(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor,
                   fan_in_fan_out: bool) -> torch.Tensor:
    """W from a merged W' = factor ⊙ (W + ΔW): W' / factor - ΔW (arguments as `merge_weight`)."""
    return weight / (factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)) - delta


# --- the reference forward (plain autograd) --------------------------------------------------------

def dora_delta(x: torch.Tensor, result: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               a: nn.Module, b: nn.Module, magnitude: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """What DoRA adds to the layer's result, in plain autograd ops (PEFT's formula):

        (scale - 1) ⊙ (result - bias) + scale ⊙ s · B A x          p == 0
        (scale - 1) ⊙ (x̃ W^T) + scale ⊙ s · B A x̃                  p > 0, x̃ = drop(x)

    Dropout draws its positions from `autograd.draw_seed()`, as `dora_linear` does, so both
    drop the same elements after the same `torch.manual_seed`.

    Args:
        x: The layer's input, (..., in).
        result: The output so far, (..., out): the base output (bias included), plus any
            adapter that ran before this one.
        weight: The base weight as (out, in); a gradient reaches it (when it requires one)
            through x̃ W^T only, n being detached.
        bias: The base bias (out,), or None.
        a: lora_A (in -> r), b: lora_B (r -> out, no bias).
        magnitude: m, (out,).
        scaling: s.
        p: Dropout probability in effect (0 in eval).

    Returns:
        (..., out) in the factors' dtype (float32 unless the base is float64).
    """
    norm = weight_norm(weight, a.weight, b.weight, scaling)  # (out,), detached
    scale = magnitude / norm  # (out,)
    x = x.to(a.weight.dtype)  # (..., in)
    if p > 0:
        x = autograd.seeded_dropout(x, p, autograd.draw_seed())
        base = nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)  # (..., out): x̃ W^T
    else:
        base = (result if bias is None else result - bias).to(x.dtype)  # (..., out): x W^T (+ earlier adapters)
    lora = b(a(x)) * scaling  # (..., r) -> (..., out)
    return (scale - 1) * base + scale * lora


# --- the training path ------------------------------------------------------------------------------

def _forward(result, x, bias, a, b, magnitude, norm, weight, scaling, p, seed):
    """The products of a DoRA forward, shared by the Function and the no-grad path.

    `result` None means the base product runs here (x, W and the factors share one dtype).

    Returns:
        (y, v, h, positions, scale): y (..., out) in the output's dtype; v (N, out) and h (N, r)
        in the factors' dtype; the dropped flat positions of the (N, in) input or None; scale (out,).
    """
    in_features, out_features = a.shape[1], b.shape[0]
    dtype = a.dtype
    x2d = x.reshape(-1, in_features)  # (N, in)
    xa = x2d if x2d.dtype == dtype else x2d.to(dtype, memory_format=torch.contiguous_format)
    positions = None
    if p > 0:
        positions = autograd.drop_positions(seed, xa.numel(), p, xa.device)  # (k,)
        xa = autograd._dropped(xa, positions, owned=xa is not x2d)  # (N, in), kept elements unscaled
    alpha = scaling / (1 - p)  # dropout's 1 / (1 - p) rides on the products' alpha
    h = torch.mm(xa, a.t())  # (N, r), unscaled
    scale = magnitude / norm  # (out,)
    if p == 0:
        if result is None:
            v = torch.mm(x2d, weight.t())  # (N, out): x W^T, the base product without its bias
        else:
            r2d = result.reshape(-1, out_features)  # (N, out)
            if bias is None:
                v = r2d.to(dtype, copy=True)
            else:  # x W^T (+ earlier adapters)
                v = torch.sub(r2d, bias) if r2d.dtype == dtype else r2d.to(dtype).sub_(bias)
        v.addmm_(h, b.t(), alpha=alpha)  # v = x W^T + s · h B^T
        y = torch.addcmul(bias.to(dtype), v, scale) if bias is not None else v * scale  # (N, out)
    else:
        xw = xa if weight.dtype == dtype else xa.to(weight.dtype)  # exact: x was in weight's dtype
        u = torch.mm(xw, weight.t()).to(dtype)  # (N, out): (x̃ W^T) · (1 - p)
        v = torch.addmm(u, h, b.t(), beta=1 / (1 - p), alpha=alpha)  # (N, out): x̃ W^T + s · h̃ B^T
        if result is None:
            y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())  # base(x)
            y.addcmul_(v, scale)
        else:
            y = torch.addcmul(result.reshape(-1, out_features).to(dtype), v, scale)
        y.sub_(u, alpha=1 / (1 - p))  # base(x) + scale ⊙ v - x̃ W^T
        del u
    out_shape = (*x.shape[:-1], out_features)
    out_dtype = dtype if result is None else result.dtype
    return y.to(out_dtype).view(out_shape), v, h, positions, scale


class DoraLinearFunction(torch.autograd.Function):
    """y = DoRA(x) (see the module docstring), with a backward that keeps v and h only.

    Two forms, as `autograd.LoraLinearFunction`:

    * result None: the base product of a frozen nn.Linear (weight, bias) runs here, so dx of
      the base and of the adapter come out of one accumulating product (x, W, factors: one dtype);
    * result (..., out), the output so far of any other base layer (its bias included, plus
      earlier adapters): DoRA rescales it; its gradient goes back through the base's own graph.

    Inputs: result or None; x (..., in); bias (out,) or None, the base bias (may train; unused
    with a result and dropout); a (r, in); b (out, r); magnitude (out,); norm (out,), detached;
    weight (out, in), frozen; then scaling, p, seed, recipe. The products run in the factors' dtype.

    Gradients, with g the output's gradient, g' = g ⊙ scale, alpha = s / (1 - p) and q =
    g ⊙ (scale - 1) / (1 - p):

        dm = Σ_N g ⊙ v / n,   dB = alpha · g'^T h,   g_h = alpha · g' B,   dA = g_h^T x̃
        p == 0:  dx = g_h A (+ g' W when the base ran here),    d result = g'
        p > 0:   dx = drop(g_h A + q W) (+ g W when the base ran here),   d result = g
        d bias = Σ_N g when the base ran here, else (1 - scale) ⊙ Σ_N g (with the base's Σ_N g')

    The per-row factors (scale, alpha, (scale - 1) / (1 - p)) are applied to the (out, r) and
    (out, in) operands where that is cheaper than to the (N, out) gradient: the only full-size
    passes of its own are dm's product (and g' when it goes back to a given result).
    """

    @staticmethod
    def forward(ctx, result, x, bias, a, b, magnitude, norm, weight, scaling, p, seed, recipe):
        y, v, h, positions, scale = _forward(result, x, bias, a, b, magnitude, norm, weight, scaling, p, seed)
        need_result, need_x, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        owned = result is None
        ctx.shapes = (None if owned else result.shape, y.dtype, x.shape, x.dtype, a.shape[1], b.shape[0], a.dtype,
                      None if bias is None else bias.dtype, owned)
        ctx.factors = (scaling, p, seed)
        ctx.recipe = None
        kept = None
        if (positions is not None and (need_x or need_a) and p <= autograd.KEEP_POSITIONS_MAX_P
                and h.shape[0] * a.shape[1] < 2**31):
            kept = positions.to(torch.int32)  # (k,)
        saved = [scale, norm if need_m else None, v if need_m else None, h if need_b else None,
                 a if need_x else None, b if (need_x or need_a) else None,
                 weight if (need_x and (owned or p > 0)) else None, kept]
        if need_a:
            autograd.stash_input(ctx, saved, x, recipe)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_result, need_x, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        result_shape, out_dtype, x_shape, x_dtype, in_features, out_features, dtype, bias_dtype, owned = ctx.shapes
        scaling, p, seed = ctx.factors
        scale, norm, v, h, a, b, weight, kept, *x_saved = ctx.saved_tensors
        rows = scale * (scaling / (1 - p))  # (out,): alpha ⊙ scale, the factor of g in dB and g_h
        g = grad.reshape(-1, out_features).to(dtype)  # (N, out)
        grad_result = grad_x = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:
            grad_m = torch.linalg.vecdot(g, v, dim=0).div_(norm)  # (out,): Σ_N g ⊙ v / n
        if need_b:
            grad_b = torch.mm(g.t(), h).mul_(rows.unsqueeze(1))  # (out, r): alpha · g'^T h
        if need_bias:
            grad_bias = (g.sum(0) if owned else g.sum(0) * (1 - scale)).to(bias_dtype)  # (out,)
        if need_x or need_a:
            g_h = torch.mm(g, b * rows.unsqueeze(1))  # (N, r): alpha · g' B
            positions = None
            if p > 0:
                positions = kept.long() if kept is not None else autograd.drop_positions(
                    seed, g_h.shape[0] * in_features, p, g_h.device)
            if need_a:
                grad_a = autograd.lora_grad_a(g_h, x_saved, ctx.recipe, positions, in_features, dtype)
            if need_x:
                dx = torch.mm(g_h, a)  # (N, in)
                if p > 0:  # the rescaled base part read the dropped input too: + q W, dropped
                    _add_product(dx, g, (scale - 1) / (1 - p), weight)
                    dx.view(-1).index_fill_(0, positions, 0)
                if owned:  # the base product's own dx: g' W (g W with dropout)
                    _add_product(dx, g, scale if p == 0 else None, weight)
                grad_x = dx.to(x_dtype).view(x_shape)
        if need_result:
            grad_result = grad if p > 0 else (g * scale).to(out_dtype).view(result_shape)
        return grad_result, grad_x, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None, None


def _add_product(out: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor) -> None:
    """out += (g ⊙ rows) W, in place.

    Args:
        out: (N, in), the factors' dtype.
        g: (N, out), the output's gradient in the factors' dtype.
        rows: (out,) factors of g's columns, or None for 1. Applied to W (out, in) when that is
            the smaller operand (N > in), else to g.
        weight: W (out, in), frozen.
    """
    if weight.dtype == out.dtype:
        if rows is None:
            out.addmm_(g, weight)
        elif g.shape[0] > weight.shape[1]:
            out.addmm_(g, weight * rows.unsqueeze(1))  # (out, in) scaled: the smaller pass
        else:
            out.addmm_(g * rows, weight)
    else:  # e.g. a bf16 base under float32 factors: the product in the base's dtype
        scaled = g if rows is None else g * rows
        out.add_(torch.mm(scaled.to(weight.dtype), weight))


def dora_linear(result: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                magnitude: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scaling: float,
                p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """The layer's output with one DoRA adapter applied, on the training path.

    Args:
        result: The output so far, (..., out): the base output (bias included), plus any
            adapter that ran before this one; not modified. Or None to run the base product
            here from `weight` and `bias` (a frozen nn.Linear); it runs in the Function when x,
            W and the factors share one dtype, otherwise as `F.linear` first.
        x: The layer's input, (..., in).
        a: lora_A's weight, (r, in).
        b: lora_B's weight, (out, r).
        magnitude: m, (out,).
        weight: The frozen base weight as (out, in) (a transposed view for Conv1D).
        bias: The base bias (out,), trainable or not, or None.
        scaling: s = lora_alpha / r (or / sqrt(r)).
        p: Dropout probability on the adapter's input, in [0, 1). Default 0 (pass 0 in eval).
        seed: The dropout seed (`autograd.draw_seed()`); drawn here when None and p > 0.

    Returns:
        A new tensor (..., out), typed like `result` (like x when the base ran here): through
        `DoraLinearFunction` when a gradient is needed, through the same products under
        no_grad otherwise.
    """
    if p > 0 and seed is None:
        seed = autograd.draw_seed()
    if result is None and not x.dtype == weight.dtype == a.dtype:
        result = nn.functional.linear(x, weight, bias)  # (..., out), in the base's dtype
    norm = weight_norm(weight, a, b, scaling)  # (out,), once per forward
    bias_used = None if result is not None and p > 0 else bias  # (with dropout a given result is kept whole)
    tensors = [t for t in (result, x, bias_used, a, b, magnitude) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        recipe = autograd.find_recipe(x) if a.requires_grad else None
        return DoraLinearFunction.apply(result, x, bias_used, a, b, magnitude, norm, weight, scaling, p, seed, recipe)
    with torch.no_grad():
        return _forward(result, x, bias_used, a, b, magnitude, norm, weight, scaling, p, seed)[0]


# --- the variant -------------------------------------------------------------------------------------

class DoraVariant(LoraVariant):
    """DoRA as a LoRA variant of `layers.linear.Linear` (nn.Linear and GPT-2's Conv1D bases).

    Its parameter is m, `lora_magnitude_vector[adapter]` (a `DoraMagnitude`); its forward is
    `dora_linear` (or `dora_delta` in plain ops); its merge rescales the rows of W + ΔW.
    """

    name = "dora"
    title = "DoRA"
    containers = ("lora_magnitude_vector",)
    reads_output = True

    def selected_by(self, config) -> bool:
        return bool(config.use_dora)

    def check(self, layer) -> None:
        """DoRA needs the base weight: a `Linear` wrapper over a 2-D float `weight`.

        Raises:
            ValueError: any other layer (Embedding, Conv, a 4-bit base).
        """
        weight = getattr(layer.base_layer, "weight", None)
        if not (isinstance(layer, Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.is_floating_point()):
            raise ValueError(f"DoRA (use_dora=True) is not implemented for {type(layer).__name__} adapters on a "
                             f"{type(layer.base_layer).__name__}; lorakit implements it on nn.Linear and GPT-2's "
                             "Conv1D only (leave this module out of target_modules, or use plain LoRA)")

    def create(self, layer, name, spec, device, dtype) -> None:
        layer.variant_store("lora_magnitude_vector")[name] = DoraMagnitude(layer.out_features, device=device,
                                                                            dtype=dtype)

    def init(self, layer, name) -> None:
        """m = ||W + ΔW||_row of the initialised adapter (||W|| when B = 0), as PEFT initialises it."""
        with torch.no_grad():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            norm = weight_norm(layer.weight_out_in(), a, b, layer.adapters[name].scaling)  # (out,)
            layer.lora_magnitude_vector[name].weight.copy_(norm)

    def delta(self, layer, x, name, result):
        spec = layer.adapters[name]
        p = spec.dropout if layer.training else 0.0
        return dora_delta(x, result, layer.weight_out_in(), getattr(layer.base_layer, "bias", None),
                          layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name].weight,
                          spec.scaling, p)

    def linear_forward(self, layer, x, name, result):
        if layer.base_weight.requires_grad:  # a trained base weight: plain ops carry its gradient
            result = layer.base_layer(x) if result is None else result
            return (result + self.delta(layer, x, name, result)).to(result.dtype)
        spec, a, b = layer.adapters[name], layer.lora_A[name], layer.lora_B[name]
        p = spec.dropout if layer.training else 0.0
        seed = autograd.draw_seed() if p > 0 else None
        return dora_linear(result, x, a.weight, b.weight, layer.lora_magnitude_vector[name].weight,
                           layer.weight_out_in(), getattr(layer.base_layer, "bias", None), spec.scaling, p, seed)

    def merge(self, layer, name, weight, unmerged, commit):
        """(m / n) ⊙ (W + ΔW) row-wise, n = ||W0 + ΔW||_row from the unmerged base weight W0 (the n
        the unmerged forward uses, as in PEFT); with `commit`, n is kept for `unmerge`."""
        record = layer.lora_magnitude_vector[name]
        norm = weight_norm(layer.weight_out_in(unmerged()), layer.lora_A[name].weight.detach().float(),
                           layer.lora_B[name].weight.detach().float(), layer.adapters[name].scaling)  # (out,)
        if commit:
            record.merged_norm = norm
        factor = record.weight.detach().float() / norm  # (out,)
        return merge_weight(weight, layer.delta_weight(name), factor, layer.fan_in_fan_out)

    def unmerge(self, layer, name, weight, commit):
        """W' / (m / n) - ΔW with the n kept at merge time; with `commit`, n is forgotten."""
        record = layer.lora_magnitude_vector[name]
        factor = record.weight.detach().float() / record.merged_norm  # (out,)
        if commit:
            record.merged_norm = None
        return unmerge_weight(weight, layer.delta_weight(name), factor, layer.fan_in_fan_out)

    def forget_merge(self, layer, name):
        layer.lora_magnitude_vector[name].merged_norm = None
