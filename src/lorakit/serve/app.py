"""`lorakit serve`: a base model and its LoRA adapters behind an OpenAI-compatible HTTP API.

Usage: lorakit serve [--model DIR] [--adapter NAME=PATH,NAME=PATH] [--adapter-dir DIR] [--port 8000]

Owns the HTTP side: the routes, request limits, turning requests into engine calls and engine
outputs into OpenAI responses or server-sent events, and the `serve` command. The engine
(`engine.py`) batches and generates; the registry (`registry.py`) decides which adapters are
in memory; `protocol.py` holds the JSON shapes.

    POST /v1/completions         POST /v1/chat/completions      GET /v1/models
    POST /v1/load_lora_adapter   POST /v1/unload_lora_adapter   GET /health   GET /metrics

A request's `model` is the base model's name or an adapter's; each request runs its own
adapter, and requests for different adapters share the same batched forward. Around the
routes: `telemetry.RequestRecorder` (outermost: metrics, one log line per request), then
`middleware.ApiKeyGuard` (with --api-key) and `middleware.BodyLimit`; `admission` holds the
request capacity (429) and deadline (504).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch
from torch import nn

from ..config import AdapterLoadError
from ..devices import resolve_device
from ..peft_model import PeftModel
from ..prompts import encode_messages, encode_text, has_chat_template
from .engine import Engine, Output, OutputStream, SamplingParams
from .registry import (
    AdapterInUseError,
    AdapterNameError,
    AdapterPathError,
    AdapterRegistry,
    UnknownModelError,
)

try:  # the `serve` extra; without it this module still imports, so `lorakit --help` can list the command
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    from .admission import Admission, Deadline, Lease
    from .middleware import ApiKeyGuard, BodyLimit, error_response
    from .protocol import (
        ApiError,
        ChatChoice,
        ChatChunkChoice,
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatDelta,
        ChatMessage,
        ChatMessageOut,
        CompletionChoice,
        CompletionRequest,
        CompletionResponse,
        LoadAdapterRequest,
        ModelCard,
        ModelList,
        UnloadAdapterRequest,
        Usage,
        new_id,
        now,
    )
    from .telemetry import Metrics, RequestRecord, RequestRecorder, request_record
except ImportError as err:
    _MISSING_EXTRA: ImportError | None = err
else:
    _MISSING_EXTRA = None

logger = logging.getLogger("lorakit.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server's limit
ADAPTER_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (the body size is `middleware.BodyLimit`'s).

    Args:
        max_prompt_tokens: Most prompt tokens.
        max_tokens_limit: Most tokens one request may generate.
        context_length: The model's context (prompt + generated tokens); None when unknown.
    """

    max_prompt_tokens: int
    max_tokens_limit: int
    context_length: int | None

    def sampling_params(self, request: CompletionRequest | ChatCompletionRequest, prompt_tokens: int,
                        default_max_tokens: int) -> SamplingParams:
        """The request's sampling parameters, after checking it against the limits.

        Raises:
            ApiError: 400 when the prompt or max_tokens is too long.
        """
        if prompt_tokens > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)", code="prompt_too_long")
        room = self.max_tokens_limit if self.context_length is None else self.context_length - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, which fills the model's context of "
                                f"{self.context_length} tokens", code="context_length_exceeded")
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.max_tokens_limit, room)
        elif max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {self.max_tokens_limit} "
                                "(--max-tokens-limit)", code="max_tokens_too_large", param="max_tokens")
        elif max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {self.context_length} tokens", code="context_length_exceeded",
                           param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                              stop=request.stop_strings, seed=request.seed)


def create_app(model: nn.Module, tokenizer: Any, *, model_name: str | None = None,
               adapters: dict[str, str] | None = None, adapter_dir: str | None = None, max_loaded: int = 8,
               max_batch_size: int = 16, max_prompt_tokens: int = 4096, max_tokens_limit: int = 1024,
               max_request_bytes: int = 1_000_000, api_key: str | None = None, adapter_loading: bool = True,
               max_queue: int = 128, request_timeout: float | None = None, body_timeout: float | None = 30.0,
               log_prompts: bool = False, batch_wait: float = 0.005) -> FastAPI:
    """The FastAPI app serving `model` and its adapters (run it with uvicorn).

    The engine thread starts with the app (its lifespan) and command-line adapters are
    attached then; a bad one makes startup fail with its reason in `app.state.startup_error`.

    Args:
        model: A causal LM, or a `PeftModel` whose adapters are served as they are (never evicted).
        tokenizer: Its tokenizer; chat needs a chat template.
        model_name: The base model's name in requests. Default: the model's `name_or_path`, else "base".
        adapters: name -> adapter folder, attached at startup (while they fit) and loadable by
            name later; these paths may lie outside `adapter_dir`.
        adapter_dir: Folder of adapters loaded on first request by their folder name.
        max_loaded: Most adapters in memory; the least recently used idle one is evicted. Default 8.
        max_batch_size: Most sequences decoded together. Default 16.
        max_prompt_tokens: Longest prompt, in tokens. Default 4096.
        max_tokens_limit: Most tokens one request may generate. Default 1024.
        max_request_bytes: Largest request body. Default 1,000,000.
        api_key: When set, every route but /health needs `Authorization: Bearer <api_key>` (401 otherwise).
        adapter_loading: False turns POST /v1/load_lora_adapter and /v1/unload_lora_adapter off (403).
        max_queue: Requests that may wait beyond the max_batch_size running ones; one more is
            answered 429 with `Retry-After`. Default 128.
        request_timeout: Seconds a completion may take from its admission, waiting included; one
            that runs longer is cancelled and answered 504 (an error event in a stream). Default: none.
        body_timeout: Seconds a request body may take to arrive (408 and the connection closed
            after). Default 30; None for no limit.
        log_prompts: Put each request's prompt (or messages) in its log line. Default False.
        batch_wait: Seconds an idle engine waits for requests arriving right after the first
            (each arrival waits again, 4 x at most), so a burst shares one prefill. Default 0.005.

    Raises:
        ValueError: a bad limit, adapter name or adapter_dir, or an unsupported model.
        ImportError: FastAPI is not installed (`pip install "lorakit[serve]"`).
    """
    _require_serve_extra()
    _check_limits({"max_prompt_tokens": max_prompt_tokens, "max_tokens_limit": max_tokens_limit,
                   "max_request_bytes": max_request_bytes, "max_queue": max_queue},
                  {"request_timeout": request_timeout, "body_timeout": body_timeout})
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base_name = model_name or getattr(base.config, "name_or_path", None) or "base"
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait=batch_wait)
    resident = list(model.peft_config) if isinstance(model, PeftModel) else []
    registry = AdapterRegistry(engine, base_name=base_name, max_loaded=max_loaded, adapter_dir=adapter_dir,
                               adapters=adapters, resident=resident)
    limits = Limits(max_prompt_tokens, max_tokens_limit, getattr(base.config, "max_position_embeddings", None))
    admission = Admission(max_batch_size + max_queue)
    metrics = Metrics(queue_depth=lambda: max(0, admission.admitted - engine.num_running),
                      running=lambda: engine.num_running, adapters_loaded=lambda: len(registry.loaded()),
                      kv_cache_bytes=lambda: engine.kv_cache_bytes,
                      batch_sizes=lambda: {"prefill": engine.stats.prefill_batch_sizes,
                                           "decode": engine.stats.decode_batch_sizes})
    vocab_size = base.config.vocab_size
    started = now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            await registry.preload()
            kv_bytes = await asyncio.wrap_future(engine.warm_up())
            logger.info(json.dumps({"event": "ready", "kv_cache_bytes": kv_bytes, "slots": max_batch_size}))
        except Exception as err:
            app.state.startup_error = err
            engine.stop()
            raise
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.engine = engine
    app.state.registry = registry
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.startup_error = None
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, timeout=body_timeout)
    if api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        cards = [ModelCard(id=base_name, created=started, root=base_name)]
        cards += [ModelCard(id=name, created=started, root=name, parent=base_name) for name in registry.loaded()]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if log_prompts:
            request_record(request.scope).prompt = body.prompt
        prompt_ids = _completion_prompt_ids(tokenizer, body.prompt, vocab_size)
        params = limits.sampling_params(body, len(prompt_ids), COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await _respond(request, body, prompt_ids, params, CompletionFormat(body.model))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if log_prompts:
            request_record(request.scope).prompt = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = _chat_prompt_ids(tokenizer, body.messages)
        params = limits.sampling_params(body, len(prompt_ids), limits.max_tokens_limit)
        return await _respond(request, body, prompt_ids, params, ChatFormat(body.model))

    if adapter_loading:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadAdapterRequest) -> Response:
            await registry.load(body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadAdapterRequest) -> Response:
            await registry.unload(body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
    else:
        for path in ADAPTER_ROUTES:
            app.add_api_route(path, _adapter_loading_disabled, methods=["POST"])

    async def _respond(request: Request, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                       params: SamplingParams, fmt: CompletionFormat | ChatFormat) -> Response:
        record = request_record(request.scope)
        record.prompt_tokens = len(prompt_ids)
        deadline = Deadline(request_timeout)
        lease = admission.enter()
        try:
            async with deadline.bound():
                adapter = await registry.acquire(body.model)
            lease.add(lambda: registry.release(adapter))
            record.adapter = body.model
            outputs = engine.submit_async(prompt_ids, adapter, params, on_done=lease.release)
        except BaseException:
            lease.release()
            raise
        generation = Generation(outputs, lease, record, deadline)
        if body.stream:
            return await _stream_response(generation, fmt, body.include_usage)
        return await _whole_response(request, generation, fmt)

    app.add_middleware(RequestRecorder, metrics=metrics, routes=frozenset(route.path for route in app.routes))
    return app


def _check_limits(counts: dict[str, int], timeouts: dict[str, float | None]) -> None:
    """Counts must be >= 1 (max_queue >= 0), timeouts > 0 seconds or None.

    Raises:
        ValueError: naming the first bad one.
    """
    for flag, value in counts.items():
        lowest = 0 if flag == "max_queue" else 1
        if value < lowest:
            raise ValueError(f"{flag} must be >= {lowest}, got {value}")
    for flag, seconds in timeouts.items():
        if seconds is not None and seconds <= 0:
            raise ValueError(f"{flag} must be > 0 seconds, got {seconds}")


async def _adapter_loading_disabled() -> Response:
    raise ApiError(403, "loading and unloading adapters over HTTP is turned off on this server "
                        "(it runs with --no-adapter-loading)", code="adapter_loading_disabled")


def _require_serve_extra() -> None:
    if _MISSING_EXTRA is not None:
        raise ImportError(f'lorakit serve needs FastAPI, uvicorn and prometheus-client: pip install "lorakit[serve]" '
                          f"({_MISSING_EXTRA})") from _MISSING_EXTRA


# --- prompts ------------------------------------------------------------------------------------------

def _completion_prompt_ids(tokenizer: Any, prompt: str | list[str] | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token ids must be in [0, {vocab_size}); got {bad[:5]}", param="prompt")
        return list(prompt)
    text = prompt if isinstance(prompt, str) else prompt[0]
    ids = encode_text(tokenizer, text)
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="prompt")
    return list(ids)


def _chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    if not has_chat_template(tokenizer):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       code="no_chat_template", param="messages")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        ids = encode_messages(tokenizer, conversation)
    except Exception as err:  # templates raise jinja errors for conversations they refuse
        raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from err
    if not ids:
        raise ApiError(400, "the messages render to no tokens", param="messages")
    return list(ids)


# --- responses ------------------------------------------------------------------------------------------

class CompletionFormat:
    """/v1/completions response and chunk shapes."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("cmpl"), now()

    def opening(self) -> list[BaseModel]:
        return []

    def chunk(self, text: str, finish_reason: str | None) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[CompletionChoice(text=text, finish_reason=finish_reason)], usage=usage)


class ChatFormat:
    """/v1/chat/completions response and chunk shapes (the first chunk carries the role)."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, new_id("chatcmpl"), now()

    def opening(self) -> list[BaseModel]:
        return [ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def chunk(self, text: str, finish_reason: str | None) -> BaseModel:
        delta = ChatDelta(content=text) if text else ChatDelta()
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                      choices=[ChatChoice(message=ChatMessageOut(content=text),
                                                          finish_reason=finish_reason)])


def _generation_error(error: BaseException) -> ApiError:
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error",
                    code="generation_failed")


class Generation:
    """One admitted request's Outputs as the response code reads them.

    Each Output is counted in the request's record; the lease (admission slot, adapter pin)
    is released as soon as the last Output arrives, before the answer is sent, so a client
    that unloads the adapter right after its answer never finds it still in use.

    Args:
        outputs: The engine's Outputs for this request.
        lease: What the request holds.
        record: The request's telemetry record.
        deadline: When the request must be done by.
    """

    def __init__(self, outputs: OutputStream, lease: Lease, record: RequestRecord, deadline: Deadline) -> None:
        self.outputs = outputs
        self.lease = lease
        self.record = record
        self.deadline = deadline

    async def next(self) -> Output:
        """The next Output.

        Raises:
            ApiError: 504 when the deadline passes first (the request is then cancelled).
        """
        try:
            async with self.deadline.bound():
                out = await anext(self.outputs)
        except ApiError:
            self.cancel()
            raise
        self.record.add_output(out)
        if out.finished:
            self.lease.release()
        return out

    def cancel(self) -> None:
        """Stop the request: its row is freed at the next engine step (idempotent)."""
        self.outputs.cancel()


async def _stream_response(generation: Generation, fmt: CompletionFormat | ChatFormat,
                           include_usage: bool) -> Response:
    """Server-sent events: OpenAI chunks, then `data: [DONE]`. The first output is awaited before
    answering, so a request that fails at once gets a plain error response with its status; a
    later failure (or the deadline) is a last `data: {"error": ...}` event instead of [DONE]."""
    try:
        first = await generation.next()
    except BaseException:
        generation.cancel()
        raise
    if first.error is not None:
        raise _generation_error(first.error)
    record = generation.record

    async def events() -> AsyncIterator[str]:
        ended = False  # [DONE] or an error event was sent
        try:
            for chunk in fmt.opening():
                yield _sse(chunk.model_dump_json())
            out = first
            while True:
                if out.error is not None:  # the status line is sent already: report in the stream
                    record.error, ended = "generation_failed", True
                    yield _sse(json.dumps(_generation_error(out.error).body()))
                    return
                if out.text or out.finish_reason:
                    yield _sse(fmt.chunk(out.text, out.finish_reason).model_dump_json())
                if out.finish_reason and include_usage:
                    yield _sse(fmt.usage_chunk(Usage.of(out.prompt_tokens, out.completion_tokens)).model_dump_json())
                if out.finished:
                    break
                try:
                    out = await generation.next()
                except ApiError as err:  # the deadline passed
                    record.error, ended = err.code, True
                    yield _sse(json.dumps(err.body()))
                    return
            ended = True
            yield _sse("[DONE]")
        finally:
            generation.cancel()  # the client left early: free its row at the next step
            if not ended:
                record.error = "client_disconnected"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _whole_response(request: Request, generation: Generation, fmt: CompletionFormat | ChatFormat) -> Response:
    """Collect the whole answer; if the client disconnects first, cancel the request."""

    async def collect() -> tuple[str, Output]:
        texts = []
        while True:
            out = await generation.next()
            if out.error is not None:
                raise _generation_error(out.error)
            texts.append(out.text)
            if out.finished:
                return "".join(texts), out

    collecting = asyncio.ensure_future(collect())
    disconnected = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnected.cancel()
        if not collecting.done():
            collecting.cancel()
            generation.cancel()
    if collecting.cancelled():
        generation.record.error = "client_disconnected"
        return Response(status_code=499)  # nobody is listening any more
    text, last = collecting.result()
    usage = Usage.of(last.prompt_tokens, last.completion_tokens)
    return JSONResponse(fmt.whole(text, last.finish_reason, usage).model_dump(mode="json"))


async def _client_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read already, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- errors and limits ----------------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    registry_errors: list[tuple[type[Exception], int, str, str]] = [
        (AdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
        (AdapterPathError, 400, "invalid_request_error", "adapter_path_not_allowed"),
        (AdapterLoadError, 400, "invalid_request_error", "invalid_adapter"),
        (UnknownModelError, 404, "not_found_error", "model_not_found"),
        (AdapterInUseError, 409, "invalid_request_error", "adapter_in_use"),
    ]
    for error_type, status, kind, code in registry_errors:
        async def registry_error(request: Request, err: Exception, status=status, kind=kind, code=code) -> JSONResponse:
            return error_response(ApiError(status, str(err), type=kind, code=code))

        app.add_exception_handler(error_type, registry_error)

    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(err.errors()))

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:  # unknown path, wrong method, ...
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, str(err.detail), type=kind), headers=err.headers)

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _validation_error(errors: list[dict]) -> ApiError:
    """A 400 naming the field at fault (`param`) from pydantic's errors.

    For a field with several accepted types (`prompt`: a string, strings or token ids) the
    error of the type the value has is reported, not the first alternative's.
    """
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return ApiError(400, f"the request body is not valid JSON: {reason}")
    chosen = next((e for e in errors if e.get("type") == "value_error"), first)
    loc = [str(part) for part in chosen.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    message = f"{'.'.join(loc)}: {chosen.get('msg')}" if loc else str(chosen.get("msg"))
    return ApiError(400, message, param=loc[0] if loc else None)


def _is_type_tag(part: Any) -> bool:
    """pydantic's name of a union member in an error location ("str", "list[int]", "function-after[...]")."""
    return isinstance(part, str) and (part in ("str", "int", "bool") or "[" in part)


# --- the command ----------------------------------------------------------------------------------------

def parse_adapter_flags(entries: list[str]) -> dict[str, str]:
    """`["fr=/srv/fr", "de=/srv/de"]` -> {"fr": "/srv/fr", "de": "/srv/de"}.

    Raises:
        ValueError: an entry without `NAME=PATH`, or a name given twice.
    """
    adapters: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter expects NAME=PATH (comma-separated for several), got {entry!r}")
        if name.strip() in adapters:
            raise ValueError(f"--adapter: the name {name.strip()!r} is given twice")
        adapters[name.strip()] = path.strip()
    return adapters


def serve(
    model: str | None = None,
    adapter: list[str] | None = None,
    adapter_dir: str | None = None,
    max_loaded: int = 8,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_prompt_tokens: int = 4096,
    max_tokens_limit: int = 1024,
    max_request_bytes: int = 1_000_000,
    dtype: Literal["fp32", "bf16"] = "fp32",
    device: str = "auto",
    served_model_name: str | None = None,
    api_key: str | None = None,
    adapter_loading: bool = True,
    max_queue: int = 128,
    request_timeout: float | None = None,
    body_timeout: float = 30.0,
    log_prompts: bool = False,
    batch_wait_ms: float = 5.0,
) -> int:
    """Serve a base model and its LoRA adapters over an OpenAI-compatible HTTP API.

    Args:
        model: A local Hugging Face model folder; the embedded default model when omitted.
        adapter: Adapters to serve, as NAME=PATH (comma-separated for several); loaded at startup.
        adapter_dir: A folder of adapter folders: a request for model NAME loads <adapter_dir>/NAME
            on first use, and POST /v1/load_lora_adapter may load paths inside it.
        max_loaded: Most adapters in memory; the least recently used idle one is evicted.
        host: Address to bind. Beyond 127.0.0.1, set --api-key (or put an authenticating proxy in front).
        port: TCP port.
        max_batch_size: Most requests decoded together in one forward.
        max_prompt_tokens: Longest prompt accepted, in tokens.
        max_tokens_limit: Most tokens one request may generate (and the chat default).
        max_request_bytes: Largest request body accepted, in bytes.
        dtype: Weights' precision.
        device: Where the model runs: auto (CUDA when present, then MPS, then CPU), cpu, cuda,
            cuda:N or mps. A device this machine lacks is an error naming the ones it has.
        served_model_name: The base model's name in requests. Default: --model as given, or the
            embedded model's name.
        api_key: Require `Authorization: Bearer KEY` on every route but /health (401 otherwise).
            Default: the LORAKIT_API_KEY environment variable; without either, no key is checked.
        adapter_loading: Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter;
            --no-adapter-loading answers them 403.
        max_queue: Requests that may wait beyond the --max-batch-size running ones; one more is
            answered 429 with Retry-After.
        request_timeout: Seconds a completion may take from its admission, waiting included; one
            that runs longer is cancelled and answered 504 (an error event in a stream). Default: none.
        body_timeout: Seconds a request body may take to arrive; a slower one is answered 408 and
            its connection closed.
        log_prompts: Put each request's prompt (or messages) in its JSON log line.
        batch_wait_ms: Milliseconds an idle server waits after a request for others arriving with
            it (each arrival waits again, 4 x at most), so a burst is prefilled together; 0 starts
            at once. Requests already running are never delayed.

    Returns:
        0 after a clean shutdown (Ctrl-C).

    Raises:
        ValueError: bad flags (`devices.DeviceError` for --device), or an adapter given with
            --adapter cannot be loaded.
        ImportError: FastAPI or uvicorn is not installed (`pip install "lorakit[serve]"`).
    """
    _require_serve_extra()
    import uvicorn

    from ..hub import DEFAULT_MODEL_NAME, ModelLoadError, load_model_and_tokenizer

    adapters = parse_adapter_flags(adapter or [])
    if not 0 <= batch_wait_ms <= 1000:
        raise ValueError(f"--batch-wait-ms must be in [0, 1000], got {batch_wait_ms}")
    api_key = _api_key(api_key)
    where = resolve_device(device)
    try:
        base, tokenizer = load_model_and_tokenizer(model, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                                                   device=where)
    except ModelLoadError as err:
        raise ValueError(str(err)) from err
    app = create_app(base, tokenizer, model_name=served_model_name or model or DEFAULT_MODEL_NAME, adapters=adapters,
                     adapter_dir=adapter_dir, max_loaded=max_loaded, max_batch_size=max_batch_size,
                     max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                     max_request_bytes=max_request_bytes, api_key=api_key, adapter_loading=adapter_loading,
                     max_queue=max_queue, request_timeout=request_timeout, body_timeout=body_timeout,
                     log_prompts=log_prompts, batch_wait=batch_wait_ms / 1000)
    _show_request_log()
    # uvicorn's access log is off: the "lorakit.serve" logger writes one JSON line per request instead
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False))
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when startup fails
        if app.state.startup_error is None:
            raise
    if app.state.startup_error is not None:
        raise ValueError(f"the server did not start: {app.state.startup_error}")
    return 0


def _api_key(flag: str | None) -> str | None:
    """--api-key, else LORAKIT_API_KEY (an empty variable counts as unset).

    Raises:
        ValueError: an empty --api-key.
    """
    if flag is None:
        return os.environ.get("LORAKIT_API_KEY") or None
    if not flag.strip():
        raise ValueError("--api-key must not be empty")
    return flag


def _show_request_log() -> None:
    """Print the request log (INFO on "lorakit.serve") on stderr, unless logging is configured already."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
