"""The training path of LoRA on linear layers: a hand-written autograd Function per adapted layer.

This file owns four things:

* `lora_linear` and `LoraLinearFunction`:

      y = base(x) + scaling · B A drop(x)      x: (..., in), A: (r, in), B: (out, r)

  For a frozen, hook-free nn.Linear the base product runs inside the Function too, so its
  backward gives dx = g W + drop(g_h A) from one accumulating product; any other base layer's
  output is added to in place. Without gradients (inference) the same products run in place
  under no_grad, with no Function;
* seeded dropout (`draw_seed`, `drop_positions`, `seeded_dropout`): the dropped elements are
  the positions of a Bernoulli(p) process drawn from a per-call seed, so there is no mask and
  no dropped copy of the input to keep: backward gets the positions back (int32, p · 32 bits
  per input element) or, above `KEEP_POSITIONS_MAX_P`, redraws them from the seed;
* input recipes (`find_recipe`): rebuilding x in backward from tensors the base's own autograd
  graph keeps anyway (an RMSNorm's input and inverse RMS; the two factors of the MLP's
  act(gate) * up), so an adapter saves no activation of its own. For an RMSNorm's output in
  float32 not even that: dA = ((g_h · rsqrt)^T h) · weight needs no rebuilt x;
* the switch between this path ("function", the default) and the plain autograd path kept as
  the reference ("plain"): `set_lora_path`, `lora_path`, or LORAKIT_LORA_PATH=plain.

What `LoraLinearFunction` saves for backward, per adapted layer:

    A, B, W                 parameters (no copy)
    h = drop(x) A^T         (N, r): r/in of the input's size
    dropped positions       int32, about p · N · in of them (none without dropout)
    x                       nothing when a recipe rebuilds it; otherwise x itself, which layers
                            reading the same input (q, k, v) share, and which is often kept by
                            the base anyway (o_proj reads a view of the attention output that
                            the attention kernel keeps); under saved-tensor hooks (gradient
                            checkpointing) always x

The scalings (lora_alpha / r and dropout's 1 / (1 - p)) ride on `addmm`'s alpha in forward and
on the (N, r) and (out, r) products in backward: no extra pass over a full-size tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PATHS = ("function", "plain")
PATH_ENV = "LORAKIT_LORA_PATH"

# Rebuild an adapter's input in backward from what the base graph keeps (see `find_recipe`).
# False: save the input instead (still shared by layers reading the same tensor).
RECOMPUTE_INPUTS = True


def _path_from_env() -> str:
    value = os.environ.get(PATH_ENV, "function")
    if value not in PATHS:
        raise ValueError(f"{PATH_ENV}={value!r}: expected one of {', '.join(PATHS)}")
    return value


_path = _path_from_env()


def get_lora_path() -> str:
    """The LoRA path linear layers use now: "function" (default) or "plain"."""
    return _path


def set_lora_path(path: str) -> None:
    """Choose the LoRA path of linear layers for the whole process.

    Args:
        path: "function" (the hand-written autograd Function, default) or "plain" (plain
            autograd ops, the reference).

    Raises:
        ValueError: an unknown path.
    """
    global _path
    if path not in PATHS:
        raise ValueError(f"unknown LoRA path {path!r}: expected one of {', '.join(PATHS)}")
    _path = path


@contextlib.contextmanager
def lora_path(path: str) -> Iterator[None]:
    """Use `path` ("function" or "plain") inside a `with` block, then restore the previous one.

    Raises:
        ValueError: an unknown path.
    """
    previous = _path
    set_lora_path(path)
    try:
        yield
    finally:
        set_lora_path(previous)


# --- seeded dropout -----------------------------------------------------------------------------

def draw_seed() -> int:
    """A seed for one dropout call, drawn from torch's default CPU generator.

    Drawing from the default generator keeps runs reproducible under `torch.manual_seed` and
    lets checkpointing (which restores the RNG state before recomputing) redraw the same seed.
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def drop_positions(seed: int, numel: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices of the elements dropout zeroes, each element dropped independently with probability p.

    The gaps between dropped elements of a Bernoulli(p) sequence are geometric, so summing
    about p · numel geometric gaps gives the positions an elementwise Bernoulli mask would
    drop, with a p-th of the random draws and no full-size mask. A gap is drawn by inversion,
    floor(log(u) / log(1 - p)) + 1 with u uniform in float32 (24 bits): the probability of any
    pattern is off from Bernoulli(p)'s by float32 rounding only (gaps longer than about
    17 / -log(1 - p) are cut there: probability 2^-24).

    Args:
        seed: From `draw_seed`; the same seed gives the same positions.
        numel: Number of elements the mask covers (in row-major order).
        p: Drop probability, in (0, 1).
        device: Where the positions (and the generator) live.

    Returns:
        Sorted int64 positions in [0, numel), shape (k,).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    log_keep = math.log1p(-p)
    mean = numel * p
    chunk = int(mean + 6 * math.sqrt(mean) + 64)  # enough in one draw except with tiny probability
    found, last = [], -1
    while last < numel:
        u = torch.rand(chunk, generator=generator, device=device)  # (chunk,) in [0, 1)
        gaps = u.log_().div_(log_keep).clamp_(max=numel).to(torch.int64).add_(1)  # (chunk,) >= 1; u = 0 -> numel + 1
        positions = gaps.cumsum_(0).add_(last)  # (chunk,) increasing
        found.append(positions)
        last = int(positions[-1])
    positions = torch.cat(found) if len(found) > 1 else found[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def _dropped(x2d: torch.Tensor, positions: torch.Tensor, owned: bool) -> torch.Tensor:
    """x2d with the elements at `positions` zeroed (unscaled); in place when `owned`."""
    out = x2d if owned and x2d.is_contiguous() else x2d.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, positions, 0)
    return out


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout with the positions of `drop_positions(seed, ...)`, in plain autograd ops.

    The reference path's dropout: same elements dropped as `LoraLinearFunction` for the same
    seed, kept elements scaled by 1 / (1 - p).

    Args:
        x: Any shape; the positions index its elements in row-major order.
        p: Drop probability in [0, 1); 0 returns x.
        seed: From `draw_seed`.
    """
    if p == 0:
        return x
    positions = drop_positions(seed, x.numel(), p, x.device)
    return x.reshape(-1).index_fill(0, positions, 0.0).view(x.shape) * (1 / (1 - p))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The LoRA path's dropout, for every layer type: `seeded_dropout` with a fresh seed while
    training with p > 0, else x itself."""
    return seeded_dropout(x, p, draw_seed()) if p > 0 and training else x


# --- input recipes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How to rebuild a tensor from tensors the autograd graph already saves.

    Attributes:
        program: An expression over the leaves: ("leaf", i), ("mul", a, b) or ("cast", a, dtype).
        leaves: The saved tensors (detached; they share storage with what the graph keeps).
        scaled: When the program is `full * row scales * column scales` with every leaf in x's
            dtype (an RMSNorm's output in float32: h * rsqrt(...) * weight): (index of the full
            leaf, indices of the (..., 1) leaves, indices of the (in,) leaves). Then
            g^T x = ((g * rows)^T full) * columns needs no rebuilt x at all. Otherwise None.
    """

    program: tuple
    leaves: tuple[torch.Tensor, ...]
    scaled: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None

    def rebuild(self, leaves: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Evaluate the program on `leaves` (default: the recipe's own)."""
        return _evaluate(self.program, self.leaves if leaves is None else leaves)


def _evaluate(program: tuple, leaves: tuple[torch.Tensor, ...]) -> torch.Tensor:
    op = program[0]
    if op == "leaf":
        return leaves[program[1]]
    if op == "mul":
        return _evaluate(program[1], leaves) * _evaluate(program[2], leaves)
    return _evaluate(program[1], leaves).to(program[2])  # "cast"


_MAX_DEPTH = 4
_verified: dict[tuple, bool] = {}  # recipe signature -> rebuilt bit-exactly the first time it was seen


def _saved_tensor_hooks_active() -> bool:
    """True under saved-tensor hooks (checkpointing, offloading): the graph's saved tensors are
    then placeholders, so recipes are not used. Conservatively True if torch hides the answer."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except Exception:  # noqa: BLE001 - a changed private signature: stay on the safe side
        return True


def _match(node, leaves: list[torch.Tensor], depth: int) -> tuple | None:
    """The program computing `node`'s output from saved tensors, appending leaves; None if none."""
    if node is None or depth == 0:
        return None
    name = type(node).__name__
    if name == "MulBackward0":
        operands = []
        for slot, attr in enumerate(("_saved_self", "_saved_other")):
            try:
                saved = getattr(node, attr)
            except RuntimeError:  # already freed by a backward
                return None
            if isinstance(saved, torch.Tensor):
                leaves.append(saved.detach())
                operands.append(("leaf", len(leaves) - 1))
            else:
                sub = _match(node.next_functions[slot][0], leaves, depth - 1)
                if sub is None:
                    return None
                operands.append(sub)
        return ("mul", operands[0], operands[1])
    if name == "ToCopyBackward0":
        metadata = getattr(node, "_input_metadata", None)  # the cast's output: dtype, device
        if not metadata:
            return None
        sub = _match(node.next_functions[0][0], leaves, depth - 1)
        return None if sub is None else ("cast", sub, metadata[0].dtype)
    return None


def _is_product(program: tuple) -> bool:
    return program[0] == "leaf" or program[0] == "mul" and _is_product(program[1]) and _is_product(program[2])


def _scaled_form(program: tuple, leaves: list[torch.Tensor], x: torch.Tensor):
    """(full, rows, columns) leaf indices when x = full * row scales * column scales, else None."""
    if not _is_product(program) or any(t.dtype != x.dtype for t in leaves):
        return None
    full, rows, columns = [], [], []
    for i, t in enumerate(leaves):
        shape = (1,) * (x.dim() - t.dim()) + tuple(t.shape)
        if shape == tuple(x.shape):
            full.append(i)
        elif all(d == 1 for d in shape[:-1]) and shape[-1] == x.shape[-1]:
            columns.append(i)  # (in,): scales features
        elif shape[-1] == 1:
            rows.append(i)  # (..., 1): scales rows
        else:
            return None
    return (full[0], tuple(rows), tuple(columns)) if len(full) == 1 else None


def find_recipe(x: torch.Tensor) -> Recipe | None:
    """A recipe rebuilding x from tensors x's autograd graph already saves, or None.

    Recognised: products and casts of saved tensors, e.g. the output of Llama's RMSNorm,

        weight * (h * rsqrt(mean(h²) + eps)).to(dtype)   leaves: weight, h, rsqrt(...)

    (h is kept by the norm's own backward), or the MLP's act(gate) * up (both kept by the
    product's backward). The first time a recipe of a given shape is seen it is rebuilt and
    compared with x bit for bit; a mismatch turns that shape of recipe off for good.

    Returns:
        None when x has no graph, under saved-tensor hooks, when `RECOMPUTE_INPUTS` is off, or
        when x is not such an expression.
    """
    if not RECOMPUTE_INPUTS or x.grad_fn is None or _saved_tensor_hooks_active():
        return None
    leaves: list[torch.Tensor] = []
    program = _match(x.grad_fn, leaves, _MAX_DEPTH)
    if program is None:
        return None
    recipe = Recipe(program, tuple(leaves), _scaled_form(program, leaves, x))
    signature = (program, tuple((t.shape, t.dtype, t.device) for t in leaves), x.shape, x.dtype)
    ok = _verified.get(signature)
    if ok is None:
        with torch.no_grad():
            rebuilt = recipe.rebuild()
            ok = rebuilt.shape == x.shape and rebuilt.dtype == x.dtype and torch.equal(rebuilt, x)
        if len(_verified) > 4096:
            _verified.clear()
        _verified[signature] = ok
    return recipe if ok else None


# --- the Function -------------------------------------------------------------------------------

# Dropped positions are kept (as int32, 32·p bits per input element: 1.6 at p = 0.05) up to this
# p, and regenerated from the seed in backward above it.
KEEP_POSITIONS_MAX_P = 0.125


class LoraLinearFunction(torch.autograd.Function):
    """y = base(x) + scaling · B A drop(x), with a backward that keeps no full-size activation.

    Two forms, by which of `result` and `weight` is given:

    * weight (and bias) of a frozen nn.Linear, result None: the base product runs here too,
      so in backward dx = g W + g_h A comes out of one accumulating product (no second
      (N, in) gradient for autograd to add);
    * result, the output of any other base layer (..., out), weight None: the update is added
      to it in place and it is returned; dx is the LoRA part only.

    Inputs: result, x (..., in), weight (out, in), bias (out,), a (r, in), b (out, r), b_bias
    (out,); then non-tensors scaling, p, seed, recipe. Absent tensors are None. The LoRA
    products run in the factors' dtype (x is cast for them); the update is added in the
    output's dtype, rounding as the reference path's `(result + delta).to(result.dtype)`.
    """

    @staticmethod
    def forward(ctx, result, x, weight, bias, a, b, b_bias, scaling, p, seed, recipe):
        in_features, out_features = a.shape[1], b.shape[0]
        x2d = x.reshape(-1, in_features)  # (N, in)
        if weight is not None:  # the base product, into a fresh (..., out) (not a view: it may be added to in place)
            result = x2d.new_empty(*x.shape[:-1], out_features, dtype=torch.result_type(x2d, weight))
            out2d = result.view(-1, out_features)  # (N, out)
            if bias is None:
                torch.mm(x2d, weight.t(), out=out2d)
            else:
                torch.addmm(bias, x2d, weight.t(), out=out2d)
        else:
            ctx.mark_dirty(result)
            out2d = result.view(-1, out_features)  # (N, out), shares result's storage
        xa = x2d if x2d.dtype == a.dtype else x2d.to(a.dtype, memory_format=torch.contiguous_format)
        positions = None
        if p > 0:
            positions = drop_positions(seed, xa.numel(), p, xa.device)  # (k,)
            xa = _dropped(xa, positions, owned=xa is not x2d)  # (N, in), kept elements unscaled
        alpha = scaling / (1 - p)  # dropout's 1/(1-p) folded into the product's alpha
        h = torch.mm(xa, a.t())  # (N, r)
        del xa
        if out2d.dtype == h.dtype and b_bias is None:
            out2d.addmm_(h, b.t(), alpha=alpha)  # out += alpha · h B^T, one pass
        else:
            delta = torch.mm(h * alpha, b.t())  # (N, out) in the factors' dtype
            if b_bias is not None:
                delta.add_(b_bias, alpha=scaling)
            out2d.add_(delta)

        need_x, _, _, need_a, need_b = ctx.needs_input_grad[1:6]
        ctx.shapes = (x.shape, x.dtype, in_features, out_features, a.dtype)
        ctx.factors = (scaling, alpha, p, seed)
        ctx.recipe = None
        kept = None
        if positions is not None and (need_x or need_a) and p <= KEEP_POSITIONS_MAX_P and x2d.numel() < 2**31:
            kept = positions.to(torch.int32)  # (k,)
        saved = [weight if need_x else None, a if need_x else None, b if (need_x or need_a) else None,
                 h if need_b else None, kept]
        if need_a:
            stash_input(ctx, saved, x, recipe)
        ctx.save_for_backward(*saved)
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_result, need_x, _, need_bias, need_a, need_b, need_b_bias = ctx.needs_input_grad[:7]
        x_shape, x_dtype, in_features, out_features, factor_dtype = ctx.shapes
        scaling, alpha, p, seed = ctx.factors
        weight, a, b, h, kept, *x_saved = ctx.saved_tensors
        g_out = grad.reshape(-1, out_features)  # (N, out) in the output's dtype
        g = g_out if g_out.dtype == factor_dtype else g_out.to(factor_dtype)  # (N, out) in the factors' dtype
        grad_x = grad_bias = grad_a = grad_b = grad_b_bias = None
        if need_bias:
            grad_bias = g_out.sum(0)  # (out,)
        if need_b:
            grad_b = torch.mm(g.t(), h).mul_(alpha)  # (out, r)
        if need_b_bias:
            grad_b_bias = g.sum(0).mul_(scaling)  # (out,)
        if need_x or need_a:
            g_h = torch.mm(g, b).mul_(alpha)  # (N, r): dL/dh with both scalings folded in
            positions = None
            if p > 0:
                positions = kept.long() if kept is not None else drop_positions(
                    seed, g_h.shape[0] * in_features, p, g_h.device)
            if need_a:
                grad_a = lora_grad_a(g_h, x_saved, ctx.recipe, positions, in_features, factor_dtype)
            if need_x:
                grad_x = _grad_x(g_out, g_h, weight, a, positions, x_dtype).view(x_shape)
        grad_result = grad if need_result else None
        return grad_result, grad_x, None, grad_bias, grad_a, grad_b, grad_b_bias, None, None, None, None


def _grad_x(g_out: torch.Tensor, g_h: torch.Tensor, weight: torch.Tensor | None, a: torch.Tensor,
            positions: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """dL/dx, (N, in): g W (when the base product ran in the Function) + drop(g_h A).

    Args:
        g_out: (N, out), the output's gradient in the output's dtype.
        g_h: (N, r), dL/dh in the factors' dtype.
        weight: The base weight (out, in), or None.
        a: (r, in).
        positions: Dropped flat positions of the (N, in) input, or None.
        dtype: x's dtype.
    """
    lora = torch.mm(g_h, a)  # (N, in)
    if positions is not None:
        lora.view(-1).index_fill_(0, positions, 0)
    if weight is None:
        return lora.to(dtype)
    if lora.dtype == dtype == weight.dtype == g_out.dtype:
        return lora.addmm_(g_out, weight)  # += g W, accumulated by the product itself
    base = torch.mm(g_out, weight)  # (N, in) in the base's dtype
    return base.add_(lora.to(base.dtype))  # as autograd would sum the two rounded gradients


def stash_input(ctx, saved: list, x: torch.Tensor, recipe: Recipe | None) -> None:
    """Append to `saved` what backward needs for dL/dA: a recipe's leaves (its program kept on
    `ctx.recipe`, the tensors going through save_for_backward), or x itself when no recipe applies."""
    if recipe is not None:
        ctx.recipe = Recipe(recipe.program, (), recipe.scaled)
        saved.extend(recipe.leaves)
    else:
        saved.append(x)


def lora_grad_a(g_h: torch.Tensor, x_saved: list[torch.Tensor], recipe: Recipe | None,
            positions: torch.Tensor | None, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """dL/dA = g_h^T drop(x), (r, in), from the saved x or the recipe's leaves.

    Args:
        g_h: (N, r), dL/dh with the scalings folded in.
        x_saved: [x] when x was saved, else the recipe's leaves.
        recipe: How to rebuild x (None when x was saved).
        positions: Dropped flat positions of the (N, in) input, or None.
        in_features: in.
        dtype: The factors' dtype.
    """
    n = g_h.shape[0]
    if recipe is not None and recipe.scaled is not None:
        full, rows, columns = recipe.scaled  # x = full * row scales * column scales
        g_rows = g_h
        for i in rows:
            g_rows = g_rows * x_saved[i].expand(*x_saved[full].shape[:-1], 1).reshape(n, 1)  # (N, r)
        source = x_saved[full].reshape(n, in_features)  # (N, in), kept by the base
        if positions is not None:
            source = _dropped(source, positions, owned=False)
        grad_a = torch.mm(g_rows.t(), source)  # (r, in)
        for i in columns:
            grad_a.mul_(x_saved[i].reshape(1, in_features))
        return grad_a
    if recipe is not None:
        x2d, owned = _evaluate(recipe.program, tuple(x_saved)).reshape(n, in_features), True  # (N, in), ours
    else:
        x2d, owned = x_saved[0].reshape(n, in_features), False  # shared with the base and other layers
    if x2d.dtype != dtype:
        x2d, owned = x2d.to(dtype, memory_format=torch.contiguous_format), True
    if positions is not None:
        x2d = _dropped(x2d, positions, owned)
    return torch.mm(g_h.t(), x2d)  # (r, in)


# --- entry point --------------------------------------------------------------------------------

def lora_linear(result: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                b_bias: torch.Tensor | None, scaling: float, p: float = 0.0, seed: int | None = None,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """base(x) + scaling · B A drop(x), from the base output or from a frozen linear's weight.

    Args:
        result: The base layer's output, (..., out), modified in place and returned; or None
            with `weight` given, to run the base product here (`F.linear(x, weight, bias)`).
        x: The layer's input, (..., in).
        a: lora_A's weight, (r, in).
        b: lora_B's weight, (out, r).
        b_bias: lora_B's bias, (out,), or None.
        scaling: lora_alpha / r (or / sqrt(r)).
        p: Dropout probability on the LoRA path's input, in [0, 1). Default 0 (pass 0 in eval).
        seed: The dropout seed (`draw_seed()`); drawn here when None and p > 0.
        weight: A frozen base weight (out, in) when `result` is None. Default None.
        bias: Its bias (out,), trainable or not, or None.

    Returns:
        The output (..., out). With gradients needed it goes through `LoraLinearFunction`;
        without, through plain in-place products.

    Raises:
        ValueError: neither or both of `result` and `weight` given, or `weight` requires grad.
    """
    if (result is None) == (weight is None):
        raise ValueError("give exactly one of result (a base output) and weight (a frozen base weight)")
    if weight is not None and weight.requires_grad:
        raise ValueError("lora_linear runs the base product only for a frozen weight")
    if p > 0 and seed is None:
        seed = draw_seed()
    if result is not None and not result.is_contiguous():
        result = result.contiguous()  # the update is added through a flat (N, out) view
    tensors = [t for t in (result, x, bias, a, b, b_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        recipe = find_recipe(x) if a.requires_grad else None
        return LoraLinearFunction.apply(result, x, weight, bias, a, b, b_bias, scaling, p, seed, recipe)
    with torch.no_grad():
        x2d = x.reshape(-1, a.shape[1])  # (N, in)
        if result is None:
            result = torch.nn.functional.linear(x2d, weight, bias).view(*x.shape[:-1], b.shape[0])
        xa = x2d if x2d.dtype == a.dtype else x2d.to(a.dtype)
        if p > 0:
            xa = _dropped(xa, drop_positions(seed, xa.numel(), p, xa.device), owned=xa is not x2d)
        alpha = scaling / (1 - p)
        h = torch.mm(xa, a.t())  # (N, r)
        out2d = result.view(-1, b.shape[0])  # (N, out)
        if out2d.dtype == h.dtype and b_bias is None:
            out2d.addmm_(h, b.t(), alpha=alpha)
        else:
            delta = torch.mm(h.mul_(alpha), b.t())  # (N, out)
            if b_bias is not None:
                delta.add_(b_bias, alpha=scaling)
            out2d.add_(delta)
    return result
