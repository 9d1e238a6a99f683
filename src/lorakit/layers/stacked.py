"""Stacked LoRA factors of one layer, for mixed-adapter batches (the Punica / S-LoRA idea).

Every plain-LoRA adapter of a `Linear` (4-bit ones included) or an `Embedding` gets a slot in
stacked tensors, zero-padded to the layer's largest rank `r_max`; slot 0 is all zeros (rows
running the base alone, or an adapter that does not target this layer):

    Linear:    a: (S, r_max, in)               slot s: lora_A (r, in) in rows :r, zeros below
    Embedding: a: (S * num_embeddings, r_max)  slot s: lora_embedding_A^T (num_embeddings, r), zeros right
    both:      b: (S, r_max, out)              slot s: (scaling · lora_B)^T (r, out), zeros below
               bias: (S, out) or None          scaling · lora_B.bias (only when an adapter has one)

With `idx` (B,) the slot of each row, a mixed batch takes one gathered product per factor,
whatever the number of adapters:

    Linear:    x: (B, L, in)  -> h = x @ a[idx]^T                 (B, L, r_max)
    Embedding: ids: (B, L)    -> h = a[idx * num_embeddings + ids] (B, L, r_max)
    both:      result + h @ b[idx] (+ bias[idx])                  (B, L, out)

Padded ranks and slot 0 add exact zeros. The gathered copies `a[idx]`, `b[idx]` of a Linear
take B · r_max · (in + out) numbers per forward; a batched matmul over them (`torch.bmm`) beat
sorting rows by adapter on CPU for small ranks (`benchmarks/mixed_batch.py`). The first product
runs as (r_max, in) @ (in, L) per row and is read transposed: on CPU about 1.6x faster than
(L, in) @ (in, r_max), whose r_max-wide output suits the matmul kernels badly. Where every row
takes one slot (a batch on one adapter, a decode step of one adapter's requests) a Linear runs
at that adapter's own rank with no gather (`LoraStack.row_slots` tells, once per batch
composition): two plain matrix products over all B · L positions, or on CPU, from 1024
positions, the batched products above over chunks of 64 positions with the one slot's factors
broadcast (`shared_chunk`: the plain product slows once its output outgrows the caches).

Where the base is a plain `nn.Linear` (`linear.plain_linear`) in the stack's dtype (float32
adapters on a float32 base, as a rule; a float16 base under float32 adapters takes the base
output as it comes), the stack runs the base product as well: the LoRA product writes a fresh
output and `addmm_` adds x @ W^T (+ bias) into it, which spares the pass that adding the LoRA
product into the base's output costs. In the issue's forward (64 rows x 64 adapters,
`benchmarks/mixed_batch.py`) that cut the forward time by 2.5-3% in three A/B runs (1.065x ->
1.032x of the base in one), about half of lorakit's LoRA overhead.

Memory: the stack is one more copy of the layer's stacked adapters,
S · r_max · (in + out) numbers (+ S · out with lora_bias) in the adapters' dtype (float32 as a
rule), larger than the adapters themselves where their ranks differ (padding to r_max).

Freshness: `stack_for(layer)` keeps one stack per layer (weakly keyed: it goes with the layer)
and rebuilds it whole when anything it was built from differs (`_Watch`): the layer's adapter
names or records (`AdapterSpec`), which factor module or tensor it holds, or a tensor's storage
pointer or `_version` (in-place training steps, `load_state_dict`, `.data =` and `.to()` all
change one). Writes through `.data` (`p.data.mul_(2)`) change none, as autograd does not see
them either: after such a write call `clear()`. A build costs one copy of the layer's adapters,
once per change; the check is a few C-level passes over the layer's adapters, per layer and
forward (about 1% of the issue's forward with 64 adapters before it was made so; see
`benchmarks/mixed_batch.py`). A deleted adapter's slot and its old tensors are held until the
layer's next mixed forward rebuilds the stack (or `clear()`).
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import Embedding
from .linear import Linear
from .variant import PLAIN

ZERO_SLOT = 0  # slot of rows that add nothing
SHARED_CHUNK, SHARED_CHUNKED_FROM = 64, 1024  # see shared_chunk
ROW_SLOTS_KEPT = 64  # batch compositions whose row index a stack keeps (`LoraStack.row_slots`)


def factor_tensors(layer, name: str) -> tuple[torch.Tensor, ...]:
    """Adapter `name`'s factor tensors in `layer`: (A, B) or (A, B, B's bias).

    """
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    b = layer.lora_B[name]
    return (layer.lora_A[name].weight, b.weight) + (() if b.bias is None else (b.bias,))


def factor_containers(layer) -> tuple[str, str]:
    """Names of the layer's two per-adapter factor containers (ModuleDicts or ParameterDicts)."""
    return ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, Embedding) else ("lora_A", "lora_B")


class _Watch:
    """What a stack was built from, compared in C-level passes (it runs on every layer of every
    mixed forward): the adapter names and records; each container, factor module and factor
    tensor, by identity, where the layer holds it; and each tensor's storage and in-place version.

    Args:
        layer: The layer, as the stack is built from it.
    """

    def __init__(self, layer) -> None:
        self.names = tuple(layer.adapters)
        self.specs = list(layer.adapters.values())
        holders = []  # (dict, key): where the layer holds each watched object
        for attr in factor_containers(layer):
            container = getattr(layer, attr)
            holders.append((layer._modules, attr))
            for name in self.names:
                if isinstance(container, nn.ParameterDict):
                    holders.append((container._parameters, name))
                else:
                    factor = container._modules[name]
                    holders.append((container._modules, name))
                    holders += [(factor._parameters, key) for key in factor._parameters]
        self.dicts = [d for d, _ in holders]
        self.keys = [k for _, k in holders]
        self.objects = [d[k] for d, k in holders]
        # Inference tensors (made under inference_mode) have no version counter: they are never
        # stacked (LoraStack leaves them out), so only their identity is watched.
        self.tensors = [o for o in self.objects if isinstance(o, torch.Tensor) and not o.is_inference()]
        self.versions = list(map(_VERSION, self.tensors))
        self.pointers = list(map(torch.Tensor.data_ptr, self.tensors))

    def unchanged(self, layer) -> bool:
        return (tuple(layer.adapters) == self.names
                and all(map(operator.is_, layer.adapters.values(), self.specs))
                and all(map(operator.is_, map(operator.getitem, self.dicts, self.keys), self.objects))
                and list(map(_VERSION, self.tensors)) == self.versions
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.pointers)


_VERSION = operator.attrgetter("_version")


def shared_chunk(x: torch.Tensor) -> int | None:
    """Positions per batch entry where a one-slot Linear product runs as a batched product over
    chunks of x's positions (N = x.numel() / in) rather than two plain matrix products: on CPU,
    for N >= SHARED_CHUNKED_FROM positions in whole chunks of SHARED_CHUNK. Measured on one
    thread (r=8, in 512; bit-identical outputs in those runs): at N=2048 x out 1376 the
    products took 1.7-2.0 ms chunked against 2.9-3.8 ms plain, about equal (within 5%) from
    N=1024 down, as the plain (N, r) @ (r, out) product slows once its output outgrows the
    caches. In the benchmark's 1-adapter forward (2048 positions, `benchmarks/mixed_batch.py`)
    that is about 1% of the forward, within the host's noise: paired A/B runs gave chunked /
    plain 0.990 (24 rounds) and 1.014 (12 rounds). None: the plain products.
    """
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or n < SHARED_CHUNKED_FROM or n % SHARED_CHUNK:
        return None
    return SHARED_CHUNK


def supports(layer) -> bool:
    """Whether `layer` has a stacked product: a `Linear` (any base, 4-bit too) or an `Embedding`
    without max_norm (which renormalizes looked-up rows in place)."""
    if isinstance(layer, Embedding):
        return layer.base_layer.max_norm is None
    return isinstance(layer, Linear)


class LoraStack:
    """The stacked plain-LoRA adapters of one layer (see the module docstring for the layout).

    Args:
        layer: A `Linear` or `Embedding` LoRA layer (`supports(layer)`).

    Attributes:
        slots: Adapter name -> slot of every adapter stacked (plain LoRA with real factors of
            one dtype and device, not inference tensors); ZERO_SLOT is none of them.
        a, b, bias: The stacked factors, as in the module docstring (None when nothing is stacked).
        dtype: Their dtype (None when nothing is stacked).
        nbytes: Bytes held by a, b and bias.
    """

    def __init__(self, layer) -> None:
        self.embedding = isinstance(layer, Embedding)
        self.watch = _Watch(layer)
        self.specs = dict(layer.adapters)
        factors = {n: factor_tensors(layer, n) for n in self.specs if self.specs[n].variant == PLAIN}
        factors = {n: f for n, f in factors.items() if not any(t.is_meta or t.is_inference() for t in f)}
        if factors:
            first = next(iter(factors.values()))[0]
            factors = {n: f for n, f in factors.items()
                       if all(t.dtype == first.dtype and t.device == first.device for t in f)}
        self.slots = {name: slot for slot, name in enumerate(factors, start=ZERO_SLOT + 1)}
        self.a = self.b = self.bias = None
        self.dtype = first.dtype if factors else None  # the stacked factors' dtype
        self.nbytes = 0
        self.ranks = [0] + [self.specs[name].r for name in self.slots]  # slot -> its adapter's rank
        self._row_slots: dict[tuple, tuple[torch.Tensor, int | None]] = {}  # see row_slots
        if factors:
            self._build(layer, factors, first)

    def _build(self, layer, factors: dict[str, tuple[torch.Tensor, ...]], first: torch.Tensor) -> None:
        r_max = max(self.specs[n].r for n in factors)
        n_slots = len(factors) + 1
        out = layer.embedding_dim if self.embedding else layer.out_features
        kw = dict(device=first.device, dtype=first.dtype)
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode builds them
            if self.embedding:
                a = torch.zeros(n_slots, layer.num_embeddings, r_max, **kw)  # (S, num_embeddings, r_max)
            else:
                a = torch.zeros(n_slots, r_max, layer.in_features, **kw)  # (S, r_max, in)
            b = torch.zeros(n_slots, r_max, out, **kw)  # (S, r_max, out)
            has_bias = any(len(f) > 2 for f in factors.values())
            bias = torch.zeros(n_slots, out, **kw) if has_bias else None  # (S, out)
            for name, slot in self.slots.items():
                spec, tensors = self.specs[name], factors[name]
                if self.embedding:
                    a[slot, :, :spec.r] = tensors[0].T  # (num_embeddings, r)
                else:
                    a[slot, :spec.r] = tensors[0]  # (r, in)
                b[slot, :spec.r] = tensors[1].T * spec.scaling  # (r, out)
                if len(tensors) > 2:
                    bias[slot] = tensors[2] * spec.scaling  # (out,)
        self.nbytes = sum(t.numel() * t.element_size() for t in (a, b, bias) if t is not None)
        self.a = a.reshape(-1, r_max) if self.embedding else a  # Embedding: (S * num_embeddings, r_max)
        self.b, self.bias = b, bias

    def current(self, layer) -> bool:
        """Whether this stack still holds what `layer` holds (see `_Watch`)."""
        return self.watch.unchanged(layer)

    def row_slots(self, names: tuple[str, ...], repeats: int, device: torch.device) -> tuple[torch.Tensor, int | None]:
        """Each row's slot for a batch whose rows run `names` (each name `repeats` consecutive rows),
        built once per batch composition and kept with the stack (a decode loop that routes the
        same names step after step builds it once; a rebuilt stack starts afresh).

        Args:
            names: One adapter name per group of `repeats` rows; names this stack does not hold
                (the base, or adapters that do not target the layer) get ZERO_SLOT.
            repeats: Rows per name.
            device: Where the index lives.

        Returns:
            (idx, shared): idx (len(names) * repeats,) long, each row's slot; shared the one
            slot every row takes, or None where the rows differ.
        """
        key = (names, repeats, device)
        held = self._row_slots.get(key)
        if held is None:
            slots = [self.slots.get(name, ZERO_SLOT) for name in names]
            idx = torch.tensor(slots, device=device)
            if repeats > 1:
                idx = idx.repeat_interleave(repeats)
            held = (idx, slots[0] if len(set(slots)) == 1 else None)
            if len(self._row_slots) >= ROW_SLOTS_KEPT:
                self._row_slots.pop(next(iter(self._row_slots)))  # the oldest composition
            self._row_slots[key] = held
        return held

    def apply(self, x: torch.Tensor, idx: torch.Tensor, shared: int | None = None, result: torch.Tensor | None = None,
              in_place: bool = False, base: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """The base output plus each row's adapter: one gathered product per factor, or where
        every row takes one slot, that slot's factors alone (no gather).

        Either the base output is given (`result`) or, for a Linear, the base layer's product is
        run here (`base`): the LoRA product writes a fresh output and the base product is added
        into it by the matrix multiply itself (`addmm_`), which spares one pass over an
        output-sized tensor (see the module docstring).

        Args:
            x: The layer's input, (B, ..., in) (an Embedding's: ids (B, ...)).
            idx: (B,) long: each row's slot.
            shared: The slot every row takes, where they all take one (`row_slots`): a Linear
                then runs at the adapter's own rank with no gathered copy (plain matrix
                products, or batched ones over chunks of positions: `shared_chunk`).
            result: The base layer's output, (B, ..., out), contiguous.
            in_place: Add into `result` itself (no new output-sized tensor: a fresh output of
                that size costs about as much as the LoRA products here).
            base: (weight (out, in), bias (out,) or None) of an nn.Linear base, in the stack's
                dtype and on its device, instead of `result` (a Linear only).

        Returns:
            (B, ..., out) in `result`'s dtype (`result` itself when `in_place`), or the stack's
            dtype with `base`.

        Raises:
            ValueError: neither or both of `result` and `base` given, or `base` for an Embedding.
        """
        if (result is None) == (base is None):
            raise ValueError("LoraStack.apply takes the base output (result=) or the base's factors (base=), one of them")
        if base is not None and self.embedding:
            raise ValueError("LoraStack.apply: base= is for a Linear's stack; an Embedding takes result=")
        if shared is not None and not self.embedding:
            chunk = shared_chunk(x) if shared != ZERO_SLOT else None
            if chunk is None:
                return self._apply_shared(x, shared, result, in_place, base)
            # The one slot's factors at its rank, broadcast over chunks of `chunk` positions.
            r = self.ranks[shared]
            x3 = x.reshape(-1, chunk, x.shape[-1]).to(self.a.dtype)  # (N / chunk, chunk, in)
            n = x3.shape[0]
            a = self.a[shared, :r].expand(n, r, -1)  # (n, r, in), no copy
            b = self.b[shared, :r].expand(n, r, -1)  # (n, r, out), no copy
            bias = None if self.bias is None else self.bias[shared].expand(n, 1, -1)  # (n, 1, out)
            return self._batched(x, x3, a, b, bias, result, in_place, base)
        rows = x.shape[0]
        if self.embedding:
            ids = x.reshape(rows, -1)  # (B, L)
            n_embeddings = self.a.shape[0] // self.b.shape[0]
            h = F.embedding(ids + (idx * n_embeddings)[:, None], self.a)  # (B, L, r_max)
            bias = None if self.bias is None else self.bias.index_select(0, idx)[:, None, :]  # (B, 1, out)
            return self._expand(h, self.b.index_select(0, idx), bias, result, in_place)
        x3 = x.reshape(rows, -1, x.shape[-1]).to(self.a.dtype)  # (B, L, in)
        bias = None if self.bias is None else self.bias.index_select(0, idx)[:, None, :]  # (B, 1, out)
        return self._batched(x, x3, self.a.index_select(0, idx), self.b.index_select(0, idx), bias,
                             result, in_place, base)

    def _batched(self, x: torch.Tensor, x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 bias: torch.Tensor | None, result: torch.Tensor | None, in_place: bool,
                 base: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
        """A Linear's batched product: x3 (n, c, in) with factors a (n, r, in), b (n, r, out) and
        the LoRA bias (n, 1, out) or None, one per batch entry (gathered per row, or one slot
        broadcast); with `base`, its bias (out,) is added to it."""
        # (r, in) @ (in, c) per entry: on CPU about 1.6x faster than (c, in) @ (in, r), whose
        # narrow output (r columns) suits the matmul kernels badly.
        h = torch.bmm(a, x3.transpose(1, 2)).transpose(1, 2)  # (n, c, r)
        if base is None:
            return self._expand(h, b, bias, result, in_place)
        weight, base_bias = base
        if base_bias is not None:
            bias = base_bias if bias is None else bias + base_bias
        n, c = h.shape[:2]
        out3 = torch.bmm(h, b) if bias is None else torch.baddbmm(bias.expand(n, c, -1), h, b)  # (n, c, out)
        out3.view(-1, out3.shape[-1]).addmm_(x3.reshape(-1, x3.shape[-1]), weight.t())  # += x @ W^T
        return out3.reshape(*x.shape[:-1], out3.shape[-1])

    def _expand(self, h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, result: torch.Tensor,
                in_place: bool) -> torch.Tensor:
        """result + h @ b (+ bias): h (n, c, r), b (n, r, out), bias (n, 1, out) or None, result
        (..., out) with n * c positions."""
        out3 = result.reshape(h.shape[0], h.shape[1], result.shape[-1])  # (n, c, out)
        if out3.dtype == b.dtype and bias is None:
            if in_place:
                return out3.baddbmm_(h, b).reshape(result.shape)
            return torch.baddbmm(out3, h, b).reshape(result.shape)
        delta = torch.bmm(h, b)  # (n, c, out)
        if bias is not None:
            delta = delta + bias
        delta = delta.to(result.dtype)
        return (out3.add_(delta) if in_place else out3 + delta).reshape(result.shape)

    def _apply_shared(self, x: torch.Tensor, slot: int, result: torch.Tensor | None, in_place: bool,
                      base: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
        """`apply` for a Linear whose rows all take `slot`: its factors at rank r, no gather."""
        if slot == ZERO_SLOT:
            return result if base is None else F.linear(x, *base)
        r = self.ranks[slot]
        a, b = self.a[slot, :r], self.b[slot, :r]  # (r, in), (r, out)
        x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)  # (N, in)
        h = torch.mm(a, x2.t()).t()  # (N, r): (r, in) @ (in, N), the faster orientation (see apply)
        if base is not None:
            weight, base_bias = base
            bias = None if self.bias is None else self.bias[slot]  # (out,)
            if base_bias is not None:
                bias = base_bias if bias is None else bias + base_bias
            out2 = torch.mm(h, b) if bias is None else torch.addmm(bias, h, b)  # (N, out)
            return out2.addmm_(x2, weight.t()).reshape(*x.shape[:-1], out2.shape[-1])  # += x @ W^T
        out2 = result.reshape(-1, result.shape[-1])  # (N, out)
        if out2.dtype == b.dtype and self.bias is None:
            if in_place:
                return out2.addmm_(h, b).reshape(result.shape)
            return torch.addmm(out2, h, b).reshape(result.shape)
        delta = torch.mm(h, b)  # (N, out)
        if self.bias is not None:
            delta = delta + self.bias[slot]
        delta = delta.to(result.dtype)
        return (out2.add_(delta) if in_place else out2 + delta).reshape(result.shape)


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear() -> None:
    """Drop every layer's stack (each is rebuilt at its next mixed forward): needed only after
    writing into a factor through `.data`, which changes no version counter."""
    _STACKS.clear()


def stack_for(layer) -> LoraStack:
    """`layer`'s stack, rebuilt first if it no longer matches the layer."""
    stack = _STACKS.get(layer)
    if stack is None or not stack.current(layer):
        stack = _STACKS[layer] = LoraStack(layer)
    return stack
