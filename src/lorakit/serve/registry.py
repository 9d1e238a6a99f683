"""Which adapters `lorakit serve` keeps in memory: names, paths, and an LRU cache with pins.

    registry = AdapterRegistry(engine, base_name="llama", adapter_dir="adapters", adapters={"fr": "/srv/fr"})
    adapter = await registry.acquire("fr")   # loads "fr" if needed; pinned until release
    ... engine.submit(..., adapter, ..., on_done=lambda: registry.release(adapter))

Owns the policy; the engine owns the mechanics (it attaches and detaches between its steps).

- Names: a request's `model` is the base model's name or an adapter's. An adapter name is a
  plain name (letters, digits, _ and -), found among the `--adapter NAME=PATH` adapters, the
  ones loaded at run time, or as a folder `<adapter-dir>/<name>`.
- Paths: a client-given `lora_path` must lie inside `--adapter-dir` (checked on the
  normalized path, so `..` cannot leave it), unless it is one given on the command line.
  Symlinks inside the folder are trusted: whoever can create them runs the server.
- Cache: at most `max_loaded` adapters are attached; loading one more evicts the least
  recently used one that no request holds. A request pins its adapter from `acquire` until
  its last output (or until the engine lets it go), so an adapter is never removed under a
  running request. When every slot is pinned, a load waits until a pin is released (the
  caller bounds that wait: the request's deadline, the queue limit) instead of failing.
- Loading: files are read and checked in a worker thread (`adapter_format.read_adapter`), so a large
  adapter delays only the requests that need it; attaching (inject, check shapes, copy) is
  short and runs between two engine steps. Concurrent requests for one adapter share one load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from .. import adapter_format
from ..config import AdapterLoadError, LoraConfig
from ..layers import BASE_ADAPTER
from ..adapter_format import check_adapter_name
from .engine import Engine


class AdapterNameError(ValueError):
    """Not a plain adapter name, the base model's name, or a name already loaded."""


class UnknownModelError(LookupError):
    """The name is neither the base model nor a known adapter."""


class AdapterPathError(ValueError):
    """A client-given adapter path is not allowed (outside --adapter-dir)."""


class AdapterInUseError(RuntimeError):
    """The adapter cannot be unloaded: running requests use it."""


class AdapterRegistry:
    """Adapters in memory while serving, least recently used evicted first.

    Args:
        engine: The engine that attaches and detaches adapters.
        base_name: The base model's name in requests.
        max_loaded: Most adapters attached at once (adapters in `resident` not counted). Default 8.
        adapter_dir: Folder whose subfolders are adapters, loaded on first use by their name.
        adapters: name -> path of adapters given on the command line; their paths may lie
            outside `adapter_dir`.
        resident: Adapters already attached to the engine's model: listed, never evicted.

    Raises:
        ValueError: max_loaded < 1, or adapter_dir is not a folder.
        AdapterNameError: an invalid adapter name.
    """

    def __init__(self, engine: Engine, *, base_name: str, max_loaded: int = 8, adapter_dir: str | None = None,
                 adapters: dict[str, str] | None = None, resident: Iterable[str] = ()) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise ValueError(f"--adapter-dir {adapter_dir!r} is not a folder")
        self.engine = engine
        self.base_name = base_name
        self.max_loaded = max_loaded
        self.adapter_dir = Path(os.path.abspath(adapter_dir)) if adapter_dir is not None else None
        self._command_line = {name: Path(os.path.abspath(path)) for name, path in (adapters or {}).items()}
        for name in [*self._command_line, *resident]:
            self._check_name(name)
        self._known = dict(self._command_line)  # name -> path, for loading again after eviction
        self._resident = set(resident)
        self._lock = threading.Lock()  # guards _loaded and _pins (release() runs on the engine thread)
        self._loaded: collections.OrderedDict[str, None] = collections.OrderedDict((n, None) for n in resident)
        self._pins: collections.Counter[str] = collections.Counter()
        # requests waiting for a name's load: once it is attached, not evicted before they pin it
        self._wanted: collections.Counter[str] = collections.Counter()
        self._changing = asyncio.Lock()  # one attach/detach decision at a time
        self._loading: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # where slot waiters are woken
        self._slot_freed: asyncio.Event | None = None  # set (and replaced) whenever a slot may have freed
        self._waiting = 0  # loads waiting for a slot

    # --- what is there -------------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Attached adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def pins(self, name: str) -> int:
        """Requests currently holding adapter `name`."""
        with self._lock:
            return self._pins[name]

    def waiting(self) -> int:
        """Loads waiting for a slot (every slot pinned by running requests)."""
        return self._waiting

    # --- requests --------------------------------------------------------------------------------------

    async def acquire(self, model: str) -> str:
        """The adapter to run for a request's `model`, attached and pinned (release it afterwards).

        Returns:
            The adapter name, or BASE_ADAPTER for the base model (nothing to release then).

        Raises:
            AdapterNameError: not a plain name.
            UnknownModelError: no such model or adapter.
            AdapterLoadError: its files are malformed or do not fit the base model.

        When every slot is pinned this waits for one (cancel it to give up: the caller's deadline).
        """
        if model == self.base_name:
            return BASE_ADAPTER
        self._check_name(model)
        with self._lock:
            if model in self._loaded:
                return self._pin(model)
            self._wanted[model] += 1  # from here until it is pinned, a load cannot evict it
        try:
            while True:  # an unload between its attach and this pin detaches it: load it again
                await self._ensure_loaded(model, self._path_for(model))
                with self._lock:
                    if model in self._loaded:
                        return self._pin(model)
        finally:
            with self._lock:
                self._wanted[model] -= 1
                freed = self._wanted[model] == 0 and self._pins[model] == 0 and model in self._loaded
            if freed:  # gave up (cancelled, an error) holding it evictable again: a waiting load may use it
                self._wake_slot_waiters()

    def _pin(self, model: str) -> str:
        """Pin a loaded adapter for one request (caller holds _lock)."""
        self._pins[model] += 1
        self._loaded.move_to_end(model)
        return model

    def release(self, adapter: str) -> None:
        """Undo one `acquire` (thread-safe; BASE_ADAPTER is ignored). The last pin's release
        wakes the loads waiting for a slot."""
        if adapter == BASE_ADAPTER:
            return
        with self._lock:
            if self._pins[adapter] == 0:
                return
            self._pins[adapter] -= 1
            freed = self._pins[adapter] == 0
        if freed:
            self._wake_slot_waiters()

    # --- administration --------------------------------------------------------------------------------

    async def preload(self) -> None:
        """Attach the command-line adapters (as many as fit), so the first requests do not wait.

        Raises:
            AdapterLoadError: one of them is bad (the server should not start then).
        """
        for name, path in list(self._command_line.items())[:self.max_loaded]:
            await self._ensure_loaded(name, path)

    async def load(self, name: str, path: str) -> None:
        """Attach adapter `name` from `path` (POST /v1/load_lora_adapter); it stays known after eviction.

        Args:
            name: A plain adapter name, not the base model's and not loaded yet.
            path: Inside --adapter-dir (relative paths are taken from there), or a command-line path.

        Raises:
            AdapterNameError: invalid or taken name.
            AdapterPathError: the path is not allowed.
            AdapterLoadError: bad files, or an adapter for another base model.

        When every slot is pinned this waits for one.
        """
        self._check_name(name)
        with self._lock:
            if name in self._loaded or name in self._loading:
                raise AdapterNameError(f"adapter {name!r} is already loaded; unload it first to replace it")
        resolved = self._allowed_path(path)
        previous = self._known.get(name)
        self._known[name] = resolved  # before the load: an unload meanwhile forgets it for good
        try:
            await self._ensure_loaded(name, resolved)
        except Exception:  # (a cancelled caller's load goes on, shielded: it stays known)
            if self._known.get(name) == resolved:  # no unload meanwhile: the name answers as before
                if previous is None:
                    self._known.pop(name, None)
                else:
                    self._known[name] = previous
            raise

    async def unload(self, name: str) -> None:
        """Detach adapter `name` (POST /v1/unload_lora_adapter).

        One loaded at run time is forgotten, even if it was evicted meanwhile (it then no longer
        answers); a command-line or --adapter-dir one can be used (and so loaded) again by name.
        A load of `name` in progress is waited for first.

        Raises:
            AdapterNameError: invalid name or the base model's name.
            UnknownModelError: neither loaded nor loaded at run time and evicted.
            AdapterInUseError: running requests use it.
        """
        self._check_name(name)
        while True:
            loading = self._loading.get(name)
            if loading is not None:
                with contextlib.suppress(Exception):  # a failed load leaves nothing to unload
                    await asyncio.shield(loading)
            async with self._changing:
                if name in self._loading:  # a request started loading it again meanwhile: wait for that too
                    continue
                with self._lock:
                    attached = name in self._loaded
                    if not attached and name not in self._known:
                        raise UnknownModelError(f"adapter {name!r} is not loaded")
                    if self._pins[name]:
                        raise AdapterInUseError(f"adapter {name!r} is used by {self._pins[name]} running request(s); "
                                                "unload it when they are done")
                    if attached:
                        del self._loaded[name]
                # forgotten before the lock is given back: no request can start loading it again
                resident, known = name in self._resident, self._known.get(name)
                self._resident.discard(name)
                if name not in self._command_line:
                    self._known.pop(name, None)
                if attached:
                    try:
                        await self._detach(name)
                    except BaseException:  # still attached (`_detach` put it back): still known too
                        if resident:
                            self._resident.add(name)
                        if known is not None:
                            self._known[name] = known
                        raise
                    self._wake_slot_waiters()
                return

    # --- internals ---------------------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if name == self.base_name:
            raise AdapterNameError(f"{name!r} is the base model's name, not an adapter")
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise AdapterNameError(str(err)) from None

    def _path_for(self, name: str) -> Path:
        if name in self._known:
            return self._known[name]
        if self.adapter_dir is not None and (self.adapter_dir / name).is_dir():
            return self.adapter_dir / name
        raise UnknownModelError(f"model {name!r} does not exist: it is neither the base model ({self.base_name!r}), "
                                "a loaded adapter, nor a folder in --adapter-dir")

    def _allowed_path(self, path: str) -> Path:
        candidate = Path(path)
        if not candidate.is_absolute() and self.adapter_dir is not None:
            candidate = self.adapter_dir / candidate
        candidate = Path(os.path.abspath(candidate))  # resolves '..' lexically
        if candidate in self._command_line.values():
            return candidate
        if self.adapter_dir is None:
            raise AdapterPathError("loading adapters by path is disabled: start the server with --adapter-dir "
                                   "(or give adapters with --adapter NAME=PATH)")
        if not candidate.is_relative_to(self.adapter_dir):
            raise AdapterPathError(f"lora_path {path!r} is outside --adapter-dir")
        return candidate

    async def _ensure_loaded(self, name: str, path: Path) -> None:
        """Load `name` unless it is loaded; concurrent callers share one load."""
        task = self._loading.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load(name, path))
            self._loading[name] = task
            task.add_done_callback(lambda done: self._load_finished(name, done))
        await asyncio.shield(task)  # a caller that gives up does not cancel the others' load

    def _load_finished(self, name: str, task: asyncio.Task) -> None:
        self._loading.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller gave up waiting

    async def _load(self, name: str, path: Path) -> None:
        try:
            config, tensors = await asyncio.to_thread(adapter_format.read_adapter, path)
        except AdapterLoadError as err:
            raise AdapterLoadError(f"cannot load adapter {name!r}: {err}") from err
        while True:
            freed = self._slot_freed_event()  # taken before looking, so no release is missed
            async with self._changing:
                with self._lock:
                    if name in self._loaded:
                        return
                if await self._make_room():
                    await self._attach(name, path, config, tensors)
                    return
            self._waiting += 1
            try:
                await freed.wait()  # every slot is pinned: wait for a release
            finally:
                self._waiting -= 1

    async def _attach(self, name: str, path: Path, config: LoraConfig, tensors: dict) -> None:
        try:
            await asyncio.wrap_future(self.engine.attach_adapter(name, config, tensors, source=str(path)))
        except AdapterLoadError:
            raise
        except (ValueError, TypeError) as err:  # targets missing in this model, unsupported layer, ...
            raise AdapterLoadError(f"cannot load adapter {name!r} from {str(path)!r}: {err}") from err
        with self._lock:
            self._loaded[name] = None

    async def _make_room(self) -> bool:
        """Evict least recently used, unpinned adapters until one more fits (caller holds _changing).

        Returns:
            False when every slot is pinned (nothing evicted then).
        """
        while True:
            with self._lock:
                evictable = [n for n in self._loaded if n not in self._resident]
                if len(evictable) < self.max_loaded:
                    return True
                victim = next((n for n in evictable if self._pins[n] == 0 and self._wanted[n] == 0), None)
                if victim is None:
                    return False
                del self._loaded[victim]  # no request can pin it from now on
            await self._detach(victim)

    def _slot_freed_event(self) -> asyncio.Event:
        """The event the next freed slot sets (on the running loop)."""
        if self._slot_freed is None:
            self._loop = asyncio.get_running_loop()
            self._slot_freed = asyncio.Event()
        return self._slot_freed

    def _wake_slot_waiters(self) -> None:
        """Wake every load waiting for a slot (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._set_slot_freed)

    def _set_slot_freed(self) -> None:
        event, self._slot_freed = self._slot_freed, asyncio.Event()
        if event is not None:
            event.set()

    async def _detach(self, name: str) -> None:
        try:
            await asyncio.wrap_future(self.engine.detach_adapter(name))
        except BaseException:
            with self._lock:
                self._loaded[name] = None  # still attached
            raise
        with self._lock:
            del self._pins[name]
