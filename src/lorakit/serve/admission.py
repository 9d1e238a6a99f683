"""Which requests `lorakit serve` takes in, and how long each may stay.

    admission = Admission(capacity=16 + 128)          # --max-batch-size + --max-queue
    lease = admission.enter()                          # ApiError 429 when full
    lease.add(lambda: registry.release(adapter))       # everything the request holds ...
    lease.release()                                    # ... given back once, from any thread
    deadline = Deadline(30.0)                          # --request-timeout
    async with deadline.bound():                       # ApiError 504 when it passes
        ...

Owns the request-level limits: the capacity (running plus queued requests, `--max-batch-size`
+ `--max-queue`; one more is answered 429 with `Retry-After`) and the per-request deadline
(`--request-timeout`). The engine and the registry know nothing of either.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

from .protocol import ApiError

RETRY_AFTER_SECONDS = 1  # what a 429 suggests: a row usually frees within a few decode steps


class Lease:
    """What one admitted request holds (its admission slot, its adapter pin, ...), given back once.

    `release()` is idempotent and thread-safe: the HTTP side calls it as soon as the last
    output arrives (so the answer never reaches the client before the slot and pin are free),
    and the engine calls it again when the request leaves it (covering failures and cancels).
    Whichever call comes second returns only once the first one's releases are done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases: list[Callable[[], None]] = []
        self._released = False

    def add(self, release: Callable[[], None]) -> None:
        """Run `release` when the lease is released (at once if it already is)."""
        with self._lock:
            if not self._released:
                self._releases.append(release)
                return
        release()

    def release(self) -> None:
        """Give back everything added, in reverse order; later calls do nothing (once it is done)."""
        with self._lock:  # held while releasing: a concurrent second call must not return early
            if self._released:
                return
            self._released = True
            releases, self._releases = self._releases[::-1], []
            for release in releases:
                release()


class Admission:
    """Counts admitted requests (thread-safe) and refuses one beyond `capacity`.

    Args:
        capacity: Most requests admitted at once (running, queued in the engine, or waiting
            for their adapter).

    Raises:
        ValueError: capacity < 1.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the request capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet released."""
        with self._lock:
            return self._admitted

    def enter(self) -> Lease:
        """Admit one request; its lease gives the place back.

        Raises:
            ApiError: 429 (code "too_many_requests", a `Retry-After` header) when full.
        """
        with self._lock:
            if self._admitted >= self.capacity:
                raise ApiError(429, f"the server is at capacity ({self.capacity} requests running or queued: "
                                    "--max-batch-size + --max-queue); retry shortly", type="rate_limit_error",
                               code="too_many_requests", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self._admitted += 1
        lease = Lease()
        lease.add(self._leave)
        return lease

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1


class Deadline:
    """The moment a request must be done by (`--request-timeout`), on the running event loop's clock.

    Args:
        seconds: Time allowed from now; None for no deadline.

    Raises:
        ValueError: seconds <= 0.
    """

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {seconds}")
        self.seconds = seconds
        self.when = None if seconds is None else asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float | None:
        """Seconds left (0 once passed), or None without a deadline."""
        return None if self.when is None else max(0.0, self.when - asyncio.get_running_loop().time())

    def error(self) -> ApiError:
        """The 504 a request that ran out of time gets."""
        return ApiError(504, f"the request ran longer than this server's limit of {self.seconds:g} s "
                             "(--request-timeout) and was cancelled", type="server_error", code="request_timeout")

    @contextlib.asynccontextmanager
    async def bound(self) -> AsyncIterator[None]:
        """Cancel the body when the deadline passes and raise `error()` instead.

        Raises:
            ApiError: 504 when the deadline passed inside the block.
        """
        try:
            async with asyncio.timeout_at(self.when):
                yield
        except TimeoutError:
            if self.remaining() != 0:  # some other timeout inside the block
                raise
            raise self.error() from None
