"""What `lorakit serve` reports about its requests: Prometheus metrics and one JSON log line each.

    metrics = Metrics(queue_depth=..., running=..., ...)   # its own CollectorRegistry
    app.add_middleware(RequestRecorder, metrics=metrics, routes=frozenset({"/v1/completions", ...}))
    record = request_record(request.scope)      # in a route: fill in adapter, tokens, ...

Owns the request record (id, route, status, adapter, tokens, latencies), the metrics it
feeds (`GET /metrics`, in Prometheus' text format) and the access log: one line per request
on the logger "lorakit.serve", a JSON object (ASCII, so always one line). A prompt appears
in it only when a route puts one in the record, which the app does only with `--log-prompts`.

Each app has its own `CollectorRegistry` (never prometheus_client's global one), so several
servers in one process do not clash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

from .engine import Output
from .protocol import new_id

logger = logging.getLogger("lorakit.serve")

RECORD_KEY = "lorakit_request"  # where the record lies in the ASGI scope's "state"
QUIET_ROUTES = frozenset({"/health", "/metrics"})  # polled often: logged at DEBUG, not INFO
OTHER_ROUTE = "other"  # the route label of paths the app does not serve (bounded label values)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass
class RequestRecord:
    """One HTTP request, as the log line and the metrics see it.

    Attributes:
        method: The HTTP method.
        route: The route's path, or "other" for a path the app does not serve.
        request_id: Also sent back in the `X-Request-Id` header.
        started: `time.monotonic()` when the request arrived.
        status: The HTTP status sent (500 if the app failed before answering).
        adapter: The request's model (base or adapter name) once it is known to exist.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        finish_reason: "stop" or "length" when the generation finished.
        error: The code of an error reported inside a stream after its 200 (e.g.
            "request_timeout"), or "client_disconnected".
        prompt: The prompt as sent (only with --log-prompts).
        token_times: `Output.emitted_at` of each generated token (for the latency histograms).
    """

    method: str
    route: str
    request_id: str = dataclasses.field(default_factory=lambda: new_id("req"))
    started: float = dataclasses.field(default_factory=time.monotonic)
    status: int | None = None
    adapter: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    prompt: Any = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    def add_output(self, out: Output) -> None:
        """Count one engine Output of this request."""
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.token_times.extend([out.emitted_at] * len(out.token_ids))
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None

    def inter_token_latencies(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:])]

    def log_fields(self, latency: float) -> dict[str, Any]:
        """The JSON object of this request's log line."""
        ttft = self.time_to_first_token
        fields = {"event": "request", "request_id": self.request_id, "method": self.method, "route": self.route,
                  "status": self.status, "adapter": self.adapter, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens, "latency_s": round(latency, 6),
                  "ttft_s": None if ttft is None else round(ttft, 6), "finish_reason": self.finish_reason,
                  "error": self.error}
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        return fields


def request_record(scope: dict) -> RequestRecord:
    """The record `RequestRecorder` made for this request (a detached one outside it)."""
    record = scope.get("state", {}).get(RECORD_KEY)
    return record if record is not None else RequestRecord(scope.get("method", ""), OTHER_ROUTE)


class Metrics:
    """The server's Prometheus metrics, on a `CollectorRegistry` of their own.

    Args:
        queue_depth: Requests admitted but not running (waiting for a row or their adapter).
        running: Requests in the running batch.
        adapters_loaded: Adapters in memory.
        kv_cache_bytes: Bytes the KV cache holds.
        batch_sizes: {"prefill" or "decode": {rows: forwards}}: how many forwards ran with
            each number of rows (the engine's counts, read at each scrape).
    """

    def __init__(self, *, queue_depth: Callable[[], float], running: Callable[[], float],
                 adapters_loaded: Callable[[], float], kv_cache_bytes: Callable[[], float],
                 batch_sizes: Callable[[], Mapping[str, Mapping[int, int]]]) -> None:
        self.registry = CollectorRegistry()
        on = {"registry": self.registry}
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by route, status and adapter",
                                ["route", "status", "adapter"], **on)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of requests that ran, by adapter",
                                     ["adapter"], **on)
        self.generated_tokens = Counter("lorakit_generation_tokens", "Tokens generated, by adapter", ["adapter"], **on)
        self.time_to_first_token = Histogram("lorakit_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated token",
                                             buckets=TTFT_BUCKETS, **on)
        self.inter_token_latency = Histogram("lorakit_inter_token_latency_seconds",
                                             "Between two tokens of one request", buckets=ITL_BUCKETS, **on)
        self.duration = Histogram("lorakit_request_duration_seconds", "From a request's arrival to its last byte",
                                  ["route"], buckets=DURATION_BUCKETS, **on)
        Gauge("lorakit_queue_depth", "Requests admitted but not running yet", **on).set_function(queue_depth)
        Gauge("lorakit_running_requests", "Requests in the running batch", **on).set_function(running)
        Gauge("lorakit_adapters_loaded", "Adapters in memory", **on).set_function(adapters_loaded)
        Gauge("lorakit_kv_cache_bytes", "Bytes the KV cache holds", **on).set_function(kv_cache_bytes)
        self.registry.register(_BatchSizes(batch_sizes))

    def observe(self, record: RequestRecord, latency: float) -> None:
        """Count one finished request."""
        adapter = record.adapter or ""
        self.requests.labels(record.route, str(record.status), adapter).inc()
        self.duration.labels(record.route).observe(latency)
        if record.adapter is None:
            return
        if record.token_times:  # it ran: its prompt went through the model
            self.prompt_tokens.labels(adapter).inc(record.prompt_tokens)
            self.generated_tokens.labels(adapter).inc(record.completion_tokens)
            self.time_to_first_token.observe(record.time_to_first_token)
        for gap in record.inter_token_latencies():
            self.inter_token_latency.observe(gap)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BatchSizes:
    """Collector of `lorakit_prefill_batch_size` (prompts per prefill forward) and
    `lorakit_decode_batch_size` (rows per decode forward), histograms built from the engine's counts."""

    HELP = {"prefill": "Prompts prefilled together, per prefill forward",
            "decode": "Requests decoded together, per decode forward"}

    def __init__(self, counts: Callable[[], Mapping[str, Mapping[int, int]]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = self.counts()
        for kind, help_text in self.HELP.items():
            sizes = dict(counts.get(kind, {}))  # a copy: the engine thread goes on counting
            buckets = [(str(le), sum(n for size, n in sizes.items() if size <= le)) for le in BATCH_BUCKETS]
            buckets.append(("+Inf", sum(sizes.values())))
            yield HistogramMetricFamily(f"lorakit_{kind}_batch_size", help_text, buckets=buckets,
                                        sum_value=sum(size * n for size, n in sizes.items()))


class RequestRecorder:
    """ASGI middleware (outermost): a `RequestRecord` per HTTP request, counted and logged when it ends.

    Adds `X-Request-Id` to every response. The request ends when the app returns: for a
    stream, after its last event (or when the client left).

    Args:
        app: The wrapped ASGI app.
        metrics: Where finished requests are counted.
        routes: The app's route paths (any other path is labelled "other").
    """

    def __init__(self, app: Any, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        record = RequestRecord(scope["method"], path if path in self.routes else OTHER_ROUTE)
        scope.setdefault("state", {})[RECORD_KEY] = record

        async def send_recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            if record.status is None:  # failed before answering: the error middleware answers 500
                record.status = 500
            self._finish(record)

    def _finish(self, record: RequestRecord) -> None:
        latency = time.monotonic() - record.started
        self.metrics.observe(record, latency)
        level = logging.DEBUG if record.route in QUIET_ROUTES else logging.INFO
        logger.log(level, json.dumps(record.log_fields(latency), default=str))
