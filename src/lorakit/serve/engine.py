"""Continuous batching for `lorakit serve`: one thread runs the model, all requests share it.

    engine = Engine(peft_model_or_base, tokenizer, max_batch_size=16)
    engine.start()
    outputs = engine.submit_async(prompt_ids, "my-adapter", SamplingParams(max_tokens=32, temperature=0))
    async for out in outputs:
        print(out.text, end="")

Owns everything that touches the model while serving: the engine thread and its loop, where
each request's keys and values live (kv_cache.py holds them), sampling, each request's text
(text_stream.py turns its tokens into text, stop strings included), and attaching or
detaching adapters (between steps, so the model never changes under a forward).

The KV cache is a `kv_cache.SlotCache`: per layer one (max_batch_size, kv_heads, capacity,
head_dim) buffer, row i = slot i. A running request owns one slot from its prefill to its last
token; the running requests always hold slots 0..B-1 (a finished row's slot is refilled by
moving the last row into it, one row copy), so a decode forward reads rows [0, B) as views.
Columns are shared: every row writes its next token at the same column t, and a request's
tokens fill the columns just before it, [start_i, t). One iteration of the loop:

    1. between steps: run queued jobs (adapter attach/detach), drop cancelled requests (their
       slots free at once), then admit waiting ones into the free slots (an idle engine first
       waits `batch_wait` for a burst's other requests)
    2. ONE prefill forward for all the admitted prompts (P = the longest), slots [B, B + G):
         input_ids: the prompts, left-padded                    (G, P)
         columns [t - P, t); attention_mask 0 over padding      (G, t)
         position_ids: 0, 1, ... from each prompt's first token (G, P)
       its last logits give each new request its first token
    3. ONE decode forward for every running request, each row with its own adapter:
         input_ids: each row's newest token, at column t         (B, 1)
         attention_mask: 1 over a row's own columns [start_i, t] (B, t + 1)
         position_ids: each row's own length n_i                 (B, 1)
         adapter_names: each row's adapter, or "__base__"
       then sample each row's next token, emit its new text, retire finished rows; t += 1

After the prefill and after the decode, each event loop gets that forward's Outputs for its
requests in one call (`submit_async`), not one wakeup per row.

When t would pass the buffers' capacity the columns are moved left (to the oldest running
request's start) or the buffers grow by a chunk; when a longer prompt joins than t leaves room
for, the columns move right. Only these rare moves copy cache contents. Buffers that grew
shrink back to one chunk after `kv_shrink_after` seconds with nothing to do.

Every decoder transformers runs with a KV cache and per-layer attention masks works:
full-attention layers and sliding-window ones (Mistral, Qwen2 with use_sliding_window, Gemma's
alternating layers). A row's tokens are consecutive columns, so transformers' sliding-window
mask over columns is a window over the row's own tokens, padded batch or not.

A failing batched forward is retried row by row, so only the request that breaks fails.
Padding is masked out, but a padded (B, ...) forward need not round exactly like a (1, ...)
one; greedy tokens equal `generate(do_sample=False)` unless two logits tie to within float
rounding (~1e-6 relative in float32).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..layers import BASE_ADAPTER
from ..peft_model import PeftModel
from .kv_cache import SlotCache
from .text_stream import TextStream


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    Args:
        max_tokens: Most tokens to generate (>= 1).
        temperature: 0 for greedy decoding (argmax); above 0 samples from softmax(logits / T).
        top_p: Nucleus sampling: sample among the most likely tokens holding this much mass.
        stop: Strings that end the text; the first one found is not part of the answer.
        seed: Seed of this request's own random generator, in [-2**63, 2**64); None picks a random one.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or below float32's smallest normal number (~1.2e-38,
        where dividing the logits by it breaks down)."""
        return self.temperature < torch.finfo(torch.float32).tiny


@dataclasses.dataclass(frozen=True)
class Output:
    """What one step produced for one request.

    Attributes:
        text: New text since the previous Output (may be empty while text is held back).
        token_ids: New token ids since the previous Output.
        finish_reason: "stop" (end-of-sequence token or stop string), "length" (max_tokens)
            or None while the request runs.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far (an end-of-sequence token counts).
        error: Set when the request failed; it is then the last Output.
        emitted_at: `time.monotonic()` when the engine produced it (for latency metrics).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: BaseException | None = None
    emitted_at: float = dataclasses.field(default_factory=time.monotonic, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring and tests.

    Attributes:
        prefills: Prompts run through the model.
        prefill_batch_sizes: `[g]` counts the prefill forwards that ran g prompts together.
        decode_batch_sizes: `[b]` counts the decode forwards that ran with b rows.
        cancelled: Requests dropped because their client cancelled (waiting or running).
        kv_columns_peak: Most columns the KV cache has had (it shrinks back when idle).
    """

    prefills: int = 0
    cancelled: int = 0
    kv_columns_peak: int = 0
    prefill_batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    decode_batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row of logits.

    The logits are shifted so their maximum is 0 before dividing by the temperature: a tiny
    temperature (1e-30) then gives -inf to every other token and 0 to the best ones, i.e.
    greedy decoding (ties sampled), never an inf/nan probability. A temperature below float32's
    smallest normal number (~1.2e-38, where the division itself breaks down) is argmax.

    Args:
        logits: (vocab,) float32 on CPU.
        params: temperature 0 means argmax (ties go to the lowest id, as in `generate`).
        generator: The request's CPU generator.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < params.top_p)  # the most likely token always stays
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclasses.dataclass(eq=False)
class _Sequence:
    """One request inside the engine (engine thread only, except `cancelled`)."""

    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    emit: Callable[[Output], None]
    on_done: Callable[[], None] | None
    text: TextStream
    generator: torch.Generator
    slot: int = -1  # its row in the KV cache while it runs
    start: int = 0  # the cache column of its first prompt token
    generated: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False  # set from any thread; read between steps
    done: bool = False

    @property
    def cache_len(self) -> int:
        """Tokens in the KV cache: the prompt and every generated token but the newest."""
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclasses.dataclass(frozen=True, eq=False)
class _AsyncSink:
    """Where `submit_async` sends a request's Outputs: an asyncio queue on its event loop.

    The engine collects these Outputs during a step and hands each event loop all of its own
    at once (`Engine._flush`): one wakeup per loop per step, not one per row."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, out: Output) -> None:
        """One Output on its own (the engine batches them instead; this keeps the sink a valid `emit`)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)


def _deliver(items: list[tuple[asyncio.Queue, Output]]) -> None:
    """On the event loop: put a step's Outputs in their queues, in order."""
    for queue, out in items:
        queue.put_nowait(out)


class RequestHandle:
    """A submitted request: `cancel()` removes it at the next step boundary (idempotent)."""

    def __init__(self, sequence: _Sequence) -> None:
        self._sequence = sequence

    def cancel(self) -> None:
        self._sequence.cancelled = True


class OutputStream:
    """A submitted request's Outputs for asyncio code: `async for out in stream`, ends after the
    finishing (or failing) Output. `cancel()` stops the request early."""

    def __init__(self, queue: asyncio.Queue, handle: RequestHandle) -> None:
        self._queue = queue
        self._handle = handle
        self._finished = False

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> Output:
        if self._finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self._finished = out.finished
        return out

    def cancel(self) -> None:
        self._handle.cancel()


class Engine:
    """Runs every request's generation in one background thread, batching them step by step.

    Args:
        model: A `PeftModel` (its adapters are served) or a plain causal LM (adapters can be
            attached later): any decoder-only transformers model whose layers are full or
            sliding-window attention (Llama, Mistral, Qwen2, Gemma, GPT-2, ...).
        tokenizer: The model's tokenizer (for decoding text and finding stop strings).
        max_batch_size: Most sequences decoded together (KV-cache slots); more wait for a free
            slot. Default 16.
        eos_token_ids: Tokens that end a sequence. Default: the tokenizer's and the model's
            generation_config's end-of-sequence ids.
        kv_chunk: Columns the KV cache starts with, grows by, and shrinks back to. Default 256.
        batch_wait: Seconds an idle engine waits, after a request arrives, for more arriving
            with it: each arrival within it waits again (4 x batch_wait at most), so a burst
            shares one prefill. 0 (the default) starts at once. Running requests are never delayed.
        kv_shrink_after: Seconds with nothing to do after which a KV cache that grew past
            kv_chunk columns shrinks back to them. Default 5.

    Raises:
        ValueError: the model is encoder-decoder, or has layers other than full or
            sliding-window attention (linear attention, state-space, shared KV, ...); or
            max_batch_size or kv_chunk below 1, batch_wait outside [0, 1], or
            kv_shrink_after not above 0.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = 16,
                 eos_token_ids: set[int] | None = None, kv_chunk: int = 256, batch_wait: float = 0.0,
                 kv_shrink_after: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if kv_chunk < 1:
            raise ValueError(f"kv_chunk must be >= 1, got {kv_chunk}")
        if not 0 <= batch_wait <= 1:
            raise ValueError(f"batch_wait must be in [0, 1] seconds, got {batch_wait}")
        if kv_shrink_after <= 0:
            raise ValueError(f"kv_shrink_after must be > 0 seconds, got {kv_shrink_after}")
        self.batch_wait = batch_wait
        self.kv_shrink_after = kv_shrink_after
        self._peft: PeftModel | None = model if isinstance(model, PeftModel) else None
        self._base: nn.Module = model.get_base_model() if isinstance(model, PeftModel) else model
        _check_supported(self._base)
        self._cache = SlotCache(self._base.config, slots=max_batch_size, chunk=kv_chunk)
        self._column = 0  # t: the cache column every running row writes its next token at
        self._base.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(self._base, tokenizer)
        self.device = next(self._base.parameters()).device
        self.stats = EngineStats()
        forward_params = inspect.signature(self._base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in forward_params
        self._pass_cache_position = "cache_position" in forward_params  # transformers that masks by it

        self._wakeup = threading.Condition()  # guards _waiting, _jobs, _stopping
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._stopping = False
        self._last_arrival = 0.0  # time.monotonic() of the latest submit
        self._running: list[_Sequence] = []  # engine thread only; self._running[i].slot == i
        self._outbox: list[tuple[_Sequence, Output]] = []  # engine thread only: this step's async Outputs
        self._leaving: list[Callable[[], None]] = []  # engine thread only: this step's finished on_done calls
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still running or waiting fail with "server is shutting down"."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
        error = RuntimeError("server is shutting down")
        for seq in [*self._running, *self._waiting]:
            self._fail(seq, error)
        self._flush()
        self._running.clear()
        self._waiting.clear()
        for _, future in self._jobs:
            future.set_exception(error)
        self._jobs.clear()

    def warm_up(self) -> concurrent.futures.Future:
        """Run one base-model token through the KV cache between steps, so its buffers are
        allocated (and the kernels' first-call costs paid) now rather than by the first request.
        With requests running it does nothing.

        Returns:
            A future of the KV cache's size in bytes; it raises what the forward raised, or
            RuntimeError when the engine is shutting down.
        """
        return self.run_between_steps(self._warm_up)

    def _warm_up(self) -> int:
        if not self._running:  # (slot 0 is free)
            with torch.inference_mode():
                self._cache.plan(slice(0, 1), write_at=0, attend_from=0)
                self._forward([BASE_ADAPTER], first_column=0, input_ids=torch.zeros(1, 1, dtype=torch.long),
                              attention_mask=torch.ones(1, 1, dtype=torch.long),
                              position_ids=torch.zeros(1, 1, dtype=torch.long))
                self._cache.clear_rows(slice(0, 1))
            self.stats.kv_columns_peak = max(self.stats.kv_columns_peak, self._cache.capacity)
        return self._cache.nbytes

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache's buffers hold (allocated by `warm_up` or the first request)."""
        return self._cache.nbytes

    # --- submitting --------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], adapter: str, params: SamplingParams,
               emit: Callable[[Output], None], on_done: Callable[[], None] | None = None) -> RequestHandle:
        """Queue a request; it joins the batch at the next step boundary.

        Args:
            prompt_ids: The prompt's token ids (at least one).
            adapter: An attached adapter's name, or BASE_ADAPTER.
            params: Sampling parameters.
            emit: Called from the engine thread with each Output, in order; must not block.
            on_done: Called from the engine thread exactly once when the request leaves the
                engine (finished, failed or cancelled), after its last Output was emitted.

        Raises:
            ValueError: empty prompt, or a seed outside [-2**63, 2**64).
        """
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {params.seed}")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = _Sequence(prompt_ids=list(prompt_ids), adapter=adapter, params=params, emit=emit, on_done=on_done,
                        text=TextStream(self.tokenizer, params.stop), generator=torch.Generator().manual_seed(seed))
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("server is shutting down")
            self._waiting.append(seq)
            self._last_arrival = time.monotonic()
            self._wakeup.notify()
        return RequestHandle(seq)

    def submit_async(self, prompt_ids: list[int], adapter: str, params: SamplingParams,
                     on_done: Callable[[], None] | None = None) -> OutputStream:
        """`submit` for asyncio code (call it on the event loop): returns the Outputs as an async iterator."""
        sink = _AsyncSink(asyncio.get_running_loop(), asyncio.Queue())
        return OutputStream(sink.queue, self.submit(prompt_ids, adapter, params, sink, on_done))

    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wakeup:
            if self._stopping:
                future.set_exception(RuntimeError("server is shutting down"))
            else:
                self._jobs.append((fn, future))
                self._wakeup.notify()
        return future

    # --- adapters (run on the engine thread, between steps) ------------------------------------------

    def attach_adapter(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
                       source: str = "") -> concurrent.futures.Future:
        """Inject an adapter already read from disk (see `adapter_format.read_adapter`) and copy its weights in.

        The future raises `AdapterLoadError` (wrong keys or shapes: another base model?),
        `TargetError` / `ConfigError` / `ValueError` (name taken, targets missing); the model is
        then as it was.
        """
        return self.run_between_steps(lambda: self._attach(name, dataclasses.replace(config, inference_mode=True),
                                                           tensors, source))

    def detach_adapter(self, name: str) -> concurrent.futures.Future:
        """Remove an adapter. The future raises KeyError (not attached) or RuntimeError (a request uses it)."""
        return self.run_between_steps(lambda: self._detach(name))

    def _attach(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
        if self._peft is None:  # wraps the targets in place; on any error the base is as it was
            self._peft = PeftModel.from_tensors(self._base, config, tensors, name, source=source)
            return
        self._peft.base_model.add_adapter_from_tensors(name, config, tensors, source=source)

    def _detach(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            raise KeyError(f"no adapter named {name!r} is attached")
        with self._wakeup:
            users = [s for s in [*self._running, *self._waiting] if s.adapter == name and not s.done]
        if users:
            raise RuntimeError(f"adapter {name!r} is used by {len(users)} request(s)")
        self._remove(name)

    def _remove(self, name: str) -> None:
        """Drop an adapter (rows are routed by name, so which one is "active" does not matter here)."""
        self._peft.base_model.remove_adapter(name)

    # --- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                idle_long = False
                while not (self._stopping or self._waiting or self._running or self._jobs or idle_long):
                    grown = self._cache.capacity > self._cache.chunk
                    idle_long = not self._wakeup.wait(self.kv_shrink_after if grown else None) and grown
                self._gather_arrivals()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            if idle_long and not (self._running or jobs):
                self._cache.shrink()  # idle for kv_shrink_after: give back what long requests grew
            for fn, future in jobs:
                try:
                    future.set_result(fn())
                except BaseException as err:  # the caller gets the error; the engine goes on
                    future.set_exception(err)
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # a bug outside the per-request guards: fail the batch, keep serving
                for seq in self._running:
                    self._fail(seq, err)
                self._running = [seq for seq in self._running if not seq.done]  # all failed: no rows to move
                self._column = 0
            finally:
                self._flush()

    def _gather_arrivals(self) -> None:
        """Idle, with requests waiting: wait until none has arrived for `batch_wait` seconds (at
        most 4 x batch_wait in all, or until the slots are full), so a burst is prefilled in one
        forward rather than split at whichever arrival woke the engine. Holds `_wakeup`."""
        if self._running or self._jobs or not self._waiting:
            return
        deadline = time.monotonic() + 4 * self.batch_wait
        while not (self._stopping or self._jobs) and len(self._waiting) < self.max_batch_size:
            wait = min(self._last_arrival + self.batch_wait, deadline) - time.monotonic()
            if wait <= 0:
                return
            self._wakeup.wait(wait)

    def _step(self) -> None:
        """Drop cancelled rows, prefill the admitted prompts together, then one decode forward for all."""
        for seq in [s for s in self._running if s.cancelled]:
            self.stats.cancelled += 1
            self._finish(seq)
        self._compact()
        admitted = []
        while len(self._running) + len(admitted) < self.max_batch_size:
            with self._wakeup:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.cancelled:
                self.stats.cancelled += 1
                self._finish(seq)
            else:
                admitted.append(seq)
        if admitted:
            self._prefill(admitted)
            self._compact()
            self._flush()  # first tokens now, not after the decode forward
        if self._running:
            self._decode()
            self._compact()

    # --- slots and columns ---------------------------------------------------------------------------

    def _compact(self) -> None:
        """Drop finished rows; the last rows move into the freed slots, so slots stay 0..B-1."""
        alive = [seq for seq in self._running if not seq.done]
        if len(alive) == len(self._running):
            return
        holes = sorted(set(range(len(alive))) - {seq.slot for seq in alive})
        movers = sorted((seq for seq in alive if seq.slot >= len(alive)), key=lambda seq: seq.slot)
        for hole, seq in zip(holes, movers):
            self._cache.copy_slot(seq.slot, hole)
            seq.slot = hole
        self._running = sorted(alive, key=lambda seq: seq.slot)
        if not self._running:
            self._column = 0

    def _make_room(self, before: int) -> None:
        """Columns for the next forward: t >= `before` (a prefill's length) and t < capacity.

        Moves the running rows' columns right when t < before, or left (down to the oldest row's
        start, keeping t >= before) when t has reached the capacity; grows the buffers by chunks
        when that is not enough.
        """
        rows = slice(0, len(self._running))
        if not self._running:
            self._column = before
        oldest = min((seq.start for seq in self._running), default=self._column)
        shift = max(before - self._column, 0)
        if shift == 0 and self._column + 1 > self._cache.capacity:
            shift = -min(oldest, self._column - before)
        self._cache.ensure_capacity(self._column + shift + 1)  # before moving right, so the columns exist
        self.stats.kv_columns_peak = max(self.stats.kv_columns_peak, self._cache.capacity)
        if shift:
            self._cache.move_columns(rows, oldest, self._column, oldest + shift)
            for seq in self._running:
                seq.start += shift
            self._column += shift

    # --- prefill and decode ----------------------------------------------------------------------------

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """One forward for the admitted prompts (left-padded), into slots [B, B + G): each one's
        first token. On failure, each prompt alone, so only the broken one fails."""
        try:
            logits = self._prefill_forward(seqs).float().cpu()  # (G, vocab)
        except Exception as err:
            if len(seqs) == 1:
                self._fail(seqs[0], err)
            else:
                for seq in seqs:
                    self._prefill([seq])
            return
        self.stats.prefills += len(seqs)
        self.stats.prefill_batch_sizes[len(seqs)] += 1
        greedy = logits.argmax(-1).tolist()  # (G,)
        for row, seq in enumerate(seqs):
            seq.slot = len(self._running)
            self._running.append(seq)
            try:
                self._advance(seq, logits[row], greedy[row])
            except Exception as err:
                self._fail(seq, err)

    def _prefill_forward(self, seqs: list[_Sequence]) -> torch.Tensor:
        """The prompts at columns [t - P, t) of the next free slots.

        Returns:
            (G, vocab) logits of each prompt's last token.
        """
        longest = max(len(seq.prompt_ids) for seq in seqs)
        self._make_room(longest)
        first, t = len(self._running), self._column
        pads = [longest - len(seq.prompt_ids) for seq in seqs]
        input_ids = torch.tensor([[0] * pad + seq.prompt_ids for seq, pad in zip(seqs, pads)])     # (G, P)
        positions = (torch.arange(longest)[None, :] - torch.tensor(pads)[:, None]).clamp(min=0)    # (G, P)
        starts = torch.tensor([t - longest + pad for pad in pads])                                 # (G,)
        attention_mask = (torch.arange(t)[None, :] >= starts[:, None]).long()                      # (G, t)
        self._cache.clear_rows(slice(first, first + len(seqs)))  # what finished requests left in these slots
        self._cache.plan(slice(first, first + len(seqs)), write_at=t - longest, attend_from=t - longest)
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        out = self._forward([seq.adapter for seq in seqs], input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions, first_column=t - longest, **extra)
        for seq, start in zip(seqs, starts.tolist()):
            seq.start = start
        return out.logits[:, -1]

    def _decode(self) -> None:
        """One forward for every running row; on failure, each row alone so only the broken one fails."""
        self._make_room(0)
        rows = self._running
        try:
            logits = self._decode_forward(0, len(rows)).float().cpu()  # (B, vocab)
        except Exception as err:
            logits = None
            if len(rows) == 1:
                self._fail(rows[0], err)
        if logits is None and len(rows) > 1:
            for seq in rows:
                try:
                    self._advance(seq, self._decode_forward(seq.slot, seq.slot + 1).float().cpu()[0])
                except Exception as err:
                    self._fail(seq, err)
        elif logits is not None:
            self.stats.decode_batch_sizes[len(rows)] += 1
            greedy = logits.argmax(-1).tolist()  # (B,): one argmax for the batch, not one per row
            for seq in rows:
                try:
                    self._advance(seq, logits[seq.slot], greedy[seq.slot])
                except Exception as err:
                    self._fail(seq, err)
        self._column += 1

    def _decode_forward(self, first: int, stop: int) -> torch.Tensor:
        """Slots [first, stop): each row's newest token at column t.

        Returns:
            (stop - first, vocab) logits of each row's next token.
        """
        seqs, t = self._running[first:stop], self._column
        starts = torch.tensor([seq.start for seq in seqs])                                         # (B,)
        attention_mask = (torch.arange(t + 1)[None, :] >= starts[:, None]).long()                  # (B, t + 1)
        self._cache.plan(slice(first, stop), write_at=t, attend_from=int(starts.min()))
        out = self._forward(
            [seq.adapter for seq in seqs],
            input_ids=torch.tensor([[seq.generated[-1]] for seq in seqs]),                        # (B, 1)
            attention_mask=attention_mask,
            position_ids=torch.tensor([[seq.cache_len] for seq in seqs]),                          # (B, 1)
            first_column=t,
        )
        return out.logits[:, -1]

    def _forward(self, adapter_names: list[str], first_column: int, **inputs: Any) -> Any:
        """The model's forward on the planned slot cache, with per-row adapters (the base alone
        when none is attached). Tensors are built on the CPU and moved here."""
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        inputs[self._cache_kwarg] = self._cache
        if self._pass_cache_position:
            inputs["cache_position"] = torch.arange(first_column, first_column + inputs["input_ids"].shape[1],
                                                    device=self.device)
        if self._peft is not None and self._peft.peft_config:
            return self._peft(adapter_names=adapter_names, use_cache=True, **inputs)
        unknown = sorted(set(adapter_names) - {BASE_ADAPTER})
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} is attached")
        return self._base(use_cache=True, **inputs)

    # --- per-sequence bookkeeping ------------------------------------------------------------------

    def _advance(self, seq: _Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample the next token from (vocab,) logits, emit the new text, finish if it ends here.
        `greedy` is argmax(logits) when the caller has it (taken for temperature 0)."""
        if greedy is not None and seq.params.greedy:
            token = greedy
        else:
            token = sample_token(logits, seq.params, seq.generator)
        seq.generated.append(token)
        text = seq.text.push(token)
        if token in self.eos_token_ids or seq.text.stopped:
            reason = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            text += seq.text.flush()
        self._emit(seq, Output(text, [token], reason, len(seq.prompt_ids), len(seq.generated)))
        if reason is not None:
            self._finish(seq)

    def _emit(self, seq: _Sequence, out: Output) -> None:
        if isinstance(seq.emit, _AsyncSink):
            self._outbox.append((seq, out))  # sent at the end of the step, see _flush
            return
        try:
            seq.emit(out)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop the work
            seq.cancelled = True

    def _flush(self) -> None:
        """Hand the step's Outputs to their event loops (one call per loop, in emission order),
        then call the `on_done` of the requests that finished."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, Output]]] = {}
        for seq, out in self._outbox:
            by_loop.setdefault(seq.emit.loop, []).append((seq, out))
        self._outbox = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(seq.emit.queue, out) for seq, out in batch])
            except RuntimeError:  # the loop is closed: nobody reads these requests any more
                for seq, _ in batch:
                    seq.cancelled = True
        leaving, self._leaving = self._leaving, []
        for on_done in leaving:
            try:
                on_done()
            except Exception:
                pass  # a bookkeeping callback must not take the engine down

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if seq.done:
            return
        self._emit(seq, Output("", [], None, len(seq.prompt_ids), len(seq.generated), error=error))
        self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.on_done is not None:
            self._leaving.append(seq.on_done)  # called by _flush, once the last Output is handed over


# --- which models -----------------------------------------------------------------------------------

def _check_supported(model: nn.Module) -> None:
    """Refuse what the engine cannot serve (the slot cache refuses layer kinds it cannot hold)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise ValueError("lorakit serve needs a transformers causal LM (with .config and .generate)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("lorakit serve supports decoder-only models, not encoder-decoder ones")


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
