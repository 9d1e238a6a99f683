"""Continuous batching for `lorakit serve`: one thread runs the model, all requests share it.

    engine = Engine(peft_model_or_base, tokenizer, max_batch_size=16)
    engine.start()
    outputs = engine.submit_async(prompt_ids, "my-adapter", SamplingParams(max_tokens=32, temperature=0))
    async for out in outputs:
        print(out.text, end="")

Owns everything that touches the model while serving: the engine thread and its loop, each
sequence's KV cache, sampling, detokenization with stop strings, and attaching or detaching
adapters (between steps, so the model never changes under a forward).

Each sequence keeps its own KV cache: per layer, keys and values of shape
(1, kv_heads, n, head_dim) for the n tokens already fed through the model; the newest token
waits in `next_token`. One iteration of the loop:

    1. between steps: run queued jobs (adapter attach/detach), drop cancelled sequences, admit
       waiting ones up to max_batch_size; each admitted prompt is prefilled ALONE,
       (1, P) -> its cache and its first token, so prompts never see padding
    2. ONE decode forward for every running sequence, each row with its own adapter:
         caches left-padded to the longest, L, and stacked      (B, kv_heads, L, head_dim) per layer
         input_ids: each row's next token                       (B, 1)
         attention_mask: 0 over a row's padding, 1 elsewhere    (B, L + 1)
         position_ids: each row's own length n_i                (B, 1)
         adapter_names: each row's adapter, or "__base__"
    3. split the batch cache back (row i keeps its last n_i + 1 positions), sample each row's
       next token, emit its new text, retire finished rows

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
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..layers import BASE_ADAPTER
from ..peft_model import PeftModel

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, kv_heads, n, head_dim)


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
        decode_batch_sizes: `[b]` counts the decode forwards that ran with b rows.
        cancelled: Requests dropped because their client cancelled (waiting or running).
    """

    prefills: int = 0
    cancelled: int = 0
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
    if params.temperature < torch.finfo(torch.float32).tiny:
        return int(torch.argmax(logits))
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < params.top_p)  # the most likely token always stays
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenization of one sequence, with stop strings.

    Text is released only once it cannot change any more: a tail that may still grow into a
    stop string (a prefix of one) or that ends in an incomplete character ("\\ufffd") is held
    back until the next token settles it.

    Args:
        tokenizer: Anything with `decode(ids, skip_special_tokens=...)`.
        stop: Stop strings; the text ends before the first one found.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0  # characters of `text` already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly released text. Sets `stopped` when a stop string appears."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # A stop string cannot start before `shown`: any prefix of one at the end was held back.
        found = [i for i in (self.text.find(s, self.shown) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._release(min(found))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The rest of the text (up to the stop string, if one was found)."""
        return "" if self.stopped else self._release(len(self.text))

    def _held_back(self) -> int:
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        tail = len(self.text) - len(self.text.rstrip("\ufffd"))
        return max(hold, tail)

    def _release(self, end: int) -> str:
        if end <= self.shown:
            return ""
        released, self.shown = self.text[self.shown:end], end
        return released


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
    kv: KVLayers = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False  # set from any thread; read between steps
    done: bool = False

    @property
    def cache_len(self) -> int:
        """Tokens in the KV cache: the prompt and every generated token but the newest."""
        return len(self.prompt_ids) + len(self.generated) - 1


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
            attached later). Any decoder whose layers keep a plain key/value cache works:
            Llama, Qwen2, Mistral without sliding window, GPT-2, ...
        tokenizer: The model's tokenizer (for decoding text and finding stop strings).
        max_batch_size: Most sequences decoded together; more wait for a free row. Default 16.
        eos_token_ids: Tokens that end a sequence. Default: the tokenizer's and the model's
            generation_config's end-of-sequence ids.

    Raises:
        ValueError: the model is encoder-decoder, or has sliding-window / non-attention layers.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = 16,
                 eos_token_ids: set[int] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._peft: PeftModel | None = model if isinstance(model, PeftModel) else None
        self._base: nn.Module = model.get_base_model() if isinstance(model, PeftModel) else model
        _check_supported(self._base)
        self._base.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(self._base, tokenizer)
        self.device = next(self._base.parameters()).device
        self.stats = EngineStats()
        forward_params = inspect.signature(self._base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in forward_params

        self._wakeup = threading.Condition()  # guards _waiting, _jobs, _stopping
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._stopping = False
        self._running: list[_Sequence] = []  # engine thread only
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
        self._running.clear()
        self._waiting.clear()
        for _, future in self._jobs:
            future.set_exception(error)
        self._jobs.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

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
                engine (finished, failed or cancelled).

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
            self._wakeup.notify()
        return RequestHandle(seq)

    def submit_async(self, prompt_ids: list[int], adapter: str, params: SamplingParams,
                     on_done: Callable[[], None] | None = None) -> OutputStream:
        """`submit` for asyncio code (call it on the event loop): returns the Outputs as an async iterator."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        handle = self.submit(prompt_ids, adapter, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                             on_done)
        return OutputStream(queue, handle)

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
                while not (self._stopping or self._waiting or self._running or self._jobs):
                    self._wakeup.wait()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
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
                self._running = []

    def _step(self) -> None:
        """Drop cancelled rows, admit and prefill new ones, then one decode forward for all."""
        for seq in [s for s in self._running if s.cancelled]:
            self.stats.cancelled += 1
            self._finish(seq)
        self._running = [s for s in self._running if not s.done]
        while len(self._running) < self.max_batch_size:
            with self._wakeup:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.cancelled:
                self.stats.cancelled += 1
                self._finish(seq)
            else:
                self._prefill(seq)
        if self._running:
            self._decode(list(self._running))
            self._running = [s for s in self._running if not s.done]

    def _prefill(self, seq: _Sequence) -> None:
        """Run one prompt alone, (1, P): its KV cache and its first token."""
        try:
            input_ids = torch.tensor([seq.prompt_ids], device=self.device)  # (1, P)
            extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
            out = self._forward([seq.adapter], input_ids=input_ids, cache=_new_cache(), **extra)
            seq.kv = _cache_layers(_output_cache(out))
            self.stats.prefills += 1
            self._advance(seq, out.logits[0, -1].float().cpu())
        except Exception as err:
            self._fail(seq, err)
            return
        if not seq.done:
            self._running.append(seq)

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One forward for `seqs`; on failure, each row alone so only the broken one fails."""
        try:
            logits = self._decode_forward(seqs).float().cpu()  # (B, vocab)
        except Exception as err:
            if len(seqs) == 1:
                self._fail(seqs[0], err)
            else:
                for seq in seqs:
                    self._decode([seq])
            return
        self.stats.decode_batch_sizes[len(seqs)] += 1
        for row, seq in enumerate(seqs):
            try:
                self._advance(seq, logits[row])
            except Exception as err:
                self._fail(seq, err)

    def _decode_forward(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Stack the rows' caches (left-padded), run one token per row, split the caches back.

        Returns:
            (B, vocab) logits of each row's next token.
        """
        lengths = [seq.cache_len for seq in seqs]
        longest = max(lengths)
        batch_kv = [
            (torch.cat([F.pad(seq.kv[i][0], (0, 0, longest - n, 0)) for seq, n in zip(seqs, lengths)]),  # (B, h, L, d)
             torch.cat([F.pad(seq.kv[i][1], (0, 0, longest - n, 0)) for seq, n in zip(seqs, lengths)]))
            for i in range(len(seqs[0].kv))
        ]
        attention_mask = torch.tensor([[0] * (longest - n) + [1] * (n + 1) for n in lengths], device=self.device)
        out = self._forward(
            [seq.adapter for seq in seqs],
            input_ids=torch.tensor([[seq.generated[-1]] for seq in seqs], device=self.device),  # (B, 1)
            attention_mask=attention_mask,                                                      # (B, L + 1)
            position_ids=torch.tensor([[n] for n in lengths], device=self.device),             # (B, 1)
            cache=_make_cache(batch_kv),
        )
        new_kv = _cache_layers(_output_cache(out))  # (B, h, L + 1, d) per layer
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            start = longest - n  # drop this row's padding; keep its n old positions and the new one
            seq.kv = [(k[row:row + 1, :, start:], v[row:row + 1, :, start:]) for k, v in new_kv]
        return out.logits[:, -1]

    def _forward(self, adapter_names: list[str], cache: Any, **inputs: Any) -> Any:
        """The model's forward with per-row adapters (the base alone when none is attached)."""
        inputs[self._cache_kwarg] = cache
        if self._peft is not None and self._peft.peft_config:
            return self._peft(adapter_names=adapter_names, use_cache=True, **inputs)
        unknown = sorted(set(adapter_names) - {BASE_ADAPTER})
        if unknown:
            raise KeyError(f"no adapter named {unknown[0]!r} is attached")
        return self._base(use_cache=True, **inputs)

    # --- per-sequence bookkeeping ------------------------------------------------------------------

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token from (vocab,) logits, emit the new text, finish if it ends here."""
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
        try:
            seq.emit(out)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop the work
            seq.cancelled = True

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if seq.done:
            return
        self._emit(seq, Output("", [], None, len(seq.prompt_ids), len(seq.generated), error=error))
        self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        seq.kv = []
        if seq.on_done is not None:
            try:
                seq.on_done()
            except Exception:
                pass  # a bookkeeping callback must not take the engine down


# --- the model's cache, across transformers versions ------------------------------------------------

def _check_supported(model: nn.Module) -> None:
    """Refuse models whose cache is not one plain key/value tensor pair per layer."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise ValueError("lorakit serve needs a transformers causal LM (with .config and .generate)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("lorakit serve supports decoder-only models, not encoder-decoder ones")
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except (ImportError, TypeError, AttributeError):  # transformers 4.x: no per-layer cache types to check
        return
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"lorakit serve supports full-attention decoders only; this model's cache has {odd} layers")


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _make_cache(layers: KVLayers) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(layers)


def _cache_layers(cache: Any) -> KVLayers:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
