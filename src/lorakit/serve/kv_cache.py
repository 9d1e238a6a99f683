"""The serving engine's KV cache: one preallocated buffer per layer, one row per request slot.

    cache = SlotCache(model.config, slots=16)
    cache.plan(rows=slice(0, 3), write_at=40, attend_from=12)   # before each forward
    out = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)

A transformers `Cache` (so every attention layer of every decoder calls `cache.update` as it
does with transformers' own caches) whose layers keep keys and values in buffers of shape
(slots, kv_heads, capacity, head_dim), allocated by the first forward, grown by `chunk`
columns when needed and shrunk back to `chunk` (`shrink`, which the engine calls after a
while with nothing to do). Slot i is row i of every buffer: a request keeps its slot from its
prefill to its last token, so nothing is restacked between steps.

Columns are shared by all slots, like the positions of a left-padded batch: a forward writes
its q new tokens at columns [write_at, write_at + q) of its rows and attends over columns
[attend_from, write_at + q). Transformers builds the attention mask from the same numbers
(`get_query_offset` is write_at, `get_mask_sizes` gives the attended range), so the caller's
2-D attention mask is indexed by absolute column: (rows, write_at + q), 0 over columns a row
does not own. A request's tokens fill consecutive columns, so a sliding window over columns is
a window over the request's own tokens, padding or not.

Layer kinds come from the model's config (`layer_types`, as transformers' DynamicCache reads
it): full-attention layers attend from `attend_from`; sliding-window layers (Mistral's
`sliding_window`, Qwen2's `use_sliding_window`, Gemma's alternating layers) from
max(attend_from, write_at - window + 1), the first column their window can reach. Sliding
layers keep full-length buffers (simple; memory as for a full layer).
"""

from __future__ import annotations

from typing import Any

import torch

try:  # transformers with per-layer cache classes
    from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
except ImportError:  # older transformers: importable, and `layer_windows` says what is missing
    Cache = CacheLayerMixin = object
    get_layer_types_and_kwargs = None

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(config: Any) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), from a transformers config.

    Raises:
        ValueError: transformers is too old for per-layer caches, or a layer is not plain or
            sliding-window attention (linear attention, chunked attention, shared KV, ...).
    """
    if get_layer_types_and_kwargs is None:
        raise ValueError("lorakit serve needs transformers >= 5.14 (per-layer cache classes and "
                         "transformers.cache_utils.get_layer_types_and_kwargs); upgrade transformers")
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    odd = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if odd:
        raise ValueError(f"lorakit serve supports full and sliding-window attention layers; this model has {odd} layers")
    if isinstance(layer_kwargs, dict):  # transformers 5.14-5.18: one dict for every layer
        layer_kwargs = [layer_kwargs] * len(layer_types)
    return [kwargs.get("sliding_window") if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, layer_kwargs)]


class SlotCache(Cache):
    """Per-slot key/value buffers for every decoder layer (see the module docstring).

    Args:
        config: The model's transformers config (its layer types and sliding windows).
        slots: Rows of every buffer: the most requests decoded together.
        chunk: Columns the buffers start with, grow by, and `shrink` back to. Default 256.

    Raises:
        ValueError: a layer kind `layer_windows` refuses, or slots/chunk below 1.
    """

    def __init__(self, config: Any, slots: int, chunk: int = 256) -> None:
        if slots < 1 or chunk < 1:
            raise ValueError(f"slots and chunk must be >= 1, got {slots} and {chunk}")
        windows = layer_windows(config)
        self.slots = slots
        self.chunk = chunk
        self.capacity = chunk
        self.rows: slice | torch.Tensor = slice(0, 0)
        self.write_at = 0
        self.attend_from = 0
        super().__init__(layers=[SlotLayer(self, window) for window in windows])

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold now (0 before the first forward allocates them)."""
        return sum(layer.nbytes for layer in self.layers)

    def plan(self, rows: slice | torch.Tensor, write_at: int, attend_from: int) -> None:
        """Set where the next forward writes and reads.

        Args:
            rows: The forward's batch rows, as slots: a slice (the buffers are read as views) or
                a (B,) index tensor.
            write_at: First column of the forward's tokens; write_at + q <= capacity.
            attend_from: First column any row attends to (<= write_at).

        Raises:
            ValueError: columns outside [0, capacity].
        """
        if not 0 <= attend_from <= write_at <= self.capacity:
            raise ValueError(f"bad plan: attend_from {attend_from}, write_at {write_at}, capacity {self.capacity}")
        self.rows, self.write_at, self.attend_from = rows, write_at, attend_from

    def ensure_capacity(self, columns: int) -> None:
        """Grow every buffer to at least `columns` columns (a multiple of `chunk`), keeping its contents."""
        if columns <= self.capacity:
            return
        capacity = -(-columns // self.chunk) * self.chunk
        for layer in self.layers:
            layer.grow(capacity)
        self.capacity = capacity  # only once every layer has it (a grow that runs out of memory changes nothing here)

    def shrink(self) -> None:
        """Back to `chunk` columns, contents dropped (nothing may be running): what a long request
        grew goes back to torch's allocator (on CUDA its cache keeps it for the next growth)."""
        if self.capacity > self.chunk:
            self.capacity = self.chunk  # first: a layer whose new buffers fail is allocated at it later
            for layer in self.layers:
                try:
                    layer.reset(self.chunk)
                except RuntimeError:  # out of memory: that layer allocates at its next forward
                    pass

    def move_columns(self, rows: slice, start: int, stop: int, to: int) -> None:
        """Copy columns [start, stop) of `rows` to [to, to + stop - start) (the ranges may overlap)."""
        if stop > start and to != start:
            for layer in self.layers:
                layer.move_columns(rows, start, stop, to)

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst`, every column (a request changing rows: columns it does
        not own must not keep what an earlier request left there)."""
        if src != dst:
            for layer in self.layers:
                layer.copy_slot(src, dst)

    def clear_rows(self, rows: slice) -> None:
        """Zero the slots `rows` (before a prefill gives them to new requests). Masked columns are
        still read by attention, and 0 * nan is nan: a non-finite key or value an earlier request
        left there would reach the new one."""
        for layer in self.layers:
            layer.clear_rows(rows)


class SlotLayer(CacheLayerMixin):
    """One decoder layer's buffers in a SlotCache.

    Args:
        cache: The SlotCache holding the plan of the next forward.
        sliding_window: Tokens a query sees, itself included; None for full attention.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: SlotCache, sliding_window: int | None) -> None:
        super().__init__()
        self.cache = cache
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Zeroed buffers (slots, kv_heads, capacity, head_dim) in the states' dtype and device
        (zeros, not empty: masked columns must hold finite numbers, as 0 * nan is nan)."""
        slots, capacity = self.cache.slots, self.cache.capacity
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros((slots, key_states.shape[1], capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((slots, value_states.shape[1], capacity, value_states.shape[3]))
        self.is_initialized = True

    def _first_column(self) -> int:
        cache = self.cache
        if self.sliding_window is None:
            return cache.attend_from
        return max(cache.attend_from, cache.write_at - self.sliding_window + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the forward's (B, kv_heads, q, head_dim) states at the planned columns.

        Returns:
            Keys and values of columns [first, write_at + q) of the forward's rows, where first is
            attend_from (sliding layers: no earlier than their window reaches).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, write_at = self.cache.rows, self.cache.write_at
        end = write_at + key_states.shape[-2]
        self.keys[rows, :, write_at:end] = key_states
        self.values[rows, :, write_at:end] = value_states
        first = self._first_column()
        if first == write_at:  # nothing older to see (a prefill): the new states are all of it
            return key_states, value_states
        return self.keys[rows, :, first:end], self.values[rows, :, first:end]  # (B, kv_heads, end - first, head_dim)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset) of what `update` returns; `query_length` may be a cache_position tensor."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        first = self._first_column()
        return self.cache.write_at + query_length - first, first

    def get_seq_length(self) -> int:
        """Columns before the forward's first token: the query offset of the mask."""
        return self.cache.write_at

    def get_max_length(self) -> int:
        return -1

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            pad = capacity - self.keys.shape[2]  # (zeros, as lazy_initialization's)
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values (read from any thread: `reset` may be running)."""
        keys, values = getattr(self, "keys", None), getattr(self, "values", None)
        return (keys.nbytes if keys is not None else 0) + (values.nbytes if values is not None else 0)

    def reset(self, capacity: int) -> None:
        """New zeroed buffers of `capacity` columns, the old ones freed first (so the peak is not
        both). If making them fails, the next forward allocates them (`lazy_initialization`)."""
        if self.is_initialized:
            shape = (*self.keys.shape[:2], capacity, self.keys.shape[3])
            self.keys = self.values = None
            self.is_initialized = False
            self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.is_initialized = True

    def move_columns(self, rows: slice, start: int, stop: int, to: int) -> None:
        if self.is_initialized:
            width = stop - start
            self.keys[rows, :, to:to + width] = self.keys[rows, :, start:stop].clone()
            self.values[rows, :, to:to + width] = self.values[rows, :, start:stop].clone()

    def copy_slot(self, src: int, dst: int) -> None:
        if self.is_initialized:
            self.keys[dst] = self.keys[src]
            self.values[dst] = self.values[src]

    def clear_rows(self, rows: slice) -> None:
        if self.is_initialized:
            self.keys[rows].zero_()
            self.values[rows].zero_()
