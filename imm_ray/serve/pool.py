"""Resident models of one replica: an LRU of loaded backends with leases.

A request holds a lease on the backend it started on, so a model that is evicted (or replaced as
``latest``) is released only after its last in-flight request finished. Concurrent requests for a
model that is loading share the one load.

With ``spares > 0`` and a ``reload`` function, released engines are kept as warm spares and a new
checkpoint is loaded by swapping its weights into a spare (vLLM ``reload_weights``: well under a
second on a GPU) instead of starting an engine (tens of seconds); a used spare is replenished in the
background. vLLM's CPU backend cannot swap weights correctly: there a spare's reload restarts it.

Loads run one at a time and reuse the engine they evict, so a burst of requests for many rounds
holds at most ``capacity`` engines (plus spares) instead of starting one per round. A load that
fails keeps the engine it was given (as a spare): a bad checkpoint never costs a working engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Generic, TypeVar

logger = logging.getLogger(__name__)

B = TypeVar("B")


@dataclass
class _Entry(Generic[B]):
    backend: B
    leases: int = 0
    retired: bool = False
    claimed: bool = False  # taken for reuse by a load: never closed or made a spare


class ModelPool(Generic[B]):
    """At most ``capacity`` idle-evictable backends; pinned paths are never evicted."""

    def __init__(self, load: Callable[[Path], Awaitable[B]], close: Callable[[B], Awaitable[None]],
                 capacity: int, reload: Callable[[B, Path], Awaitable[B]] | None = None, spares: int = 0) -> None:
        self._load, self._close, self.capacity = load, close, capacity
        self._reload, self.max_spares = reload, (spares if reload else 0)
        self._spares: list[B] = []
        self._replenishing: asyncio.Task | None = None
        self._entries: OrderedDict[Path, _Entry[B]] = OrderedDict()
        self._loading: dict[Path, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._waiting: dict[Path, int] = {}  # leases waiting for their load: never evicted meanwhile
        self._load_lock = asyncio.Lock()
        self._suspect: set[int] = set()  # ids of engines whose last reload failed
        self.pinned: set[Path] = set()

    def resident(self) -> list[Path]:
        """Loaded paths, least recently used first."""
        return [p for p, e in self._entries.items() if not e.retired]

    def backends(self) -> list[tuple[Path | None, B]]:
        """Every open backend with its checkpoint (None for spares)."""
        return [(p, e.backend) for p, e in self._entries.items()] + [(None, b) for b in self._spares]

    def is_resident(self, path: Path) -> bool:
        e = self._entries.get(path)
        return e is not None and not e.retired

    async def ensure(self, path: Path) -> B:
        """Load ``path`` unless it is resident (sharing a load in progress); return its backend."""
        entry = self._entries.get(path)
        if entry is not None and not entry.retired:
            self._entries.move_to_end(path)
            return entry.backend
        task = self._loading.get(path)
        if task is None:
            task = asyncio.ensure_future(self._load_and_insert(path))
            self._loading[path] = task
        return await asyncio.shield(task)

    @property
    def spares(self) -> int:
        return len(self._spares)

    async def add_spare(self, path: Path) -> None:
        """Start spare engines (on any checkpoint of the architecture, e.g. ``path``) up to ``spares``."""
        while self._spares_missing() > 0:
            backend = await self._load(path)
            if self._spares_missing() <= 0:  # an evicted engine filled the slot meanwhile
                await self._close(backend)
                return
            self._spares.append(backend)
            logger.info("spare engine ready (%d/%d)", len(self._spares), self.max_spares)

    def _spares_missing(self) -> int:
        """Spare slots that neither a spare nor a retiring engine (once drained) will fill; none while
        the pool is full with an unpinned engine (the next load reuses the engine it evicts)."""
        live = [p for p, e in self._entries.items() if not e.retired]
        if len(live) >= self.capacity and any(p not in self.pinned for p in live):
            return 0
        retiring = sum(e.retired and not e.claimed for e in self._entries.values())
        return self.max_spares - len(self._spares) - retiring

    def replenish(self, path: Path) -> None:
        """Start spare engines in the background up to ``spares`` (after a swap or at start)."""
        if self._spares_missing() > 0 and (self._replenishing is None or self._replenishing.done()):
            self._replenishing = asyncio.ensure_future(self.add_spare(path))
            self._replenishing.add_done_callback(_log_failure)

    async def _take_victim(self, path: Path) -> B | None:
        """The engine that loading ``path`` would evict anyway, once its requests drained (or None)."""
        while True:
            live = [p for p, e in self._entries.items() if not e.retired]
            if self._reload is None or len(live) < self.capacity:
                return None
            candidates = [p for p in live if p not in self.pinned and p != path]
            if not candidates:
                return None
            victim = next((p for p in candidates if p not in self._waiting), None)
            if victim is not None:
                break
            await asyncio.sleep(0.01)  # a lease is about to take a just-loaded engine
        entry = self._entries[victim]
        entry.retired = entry.claimed = True  # new requests for it load it again
        while entry.leases:
            await asyncio.sleep(0.05)
        if self._entries.get(victim) is entry:
            del self._entries[victim]
        logger.info("reusing the engine of %s for %s", victim, path)
        return entry.backend

    async def _load_and_insert(self, path: Path) -> B:
        try:
            async with self._load_lock:
                spare = self._spares.pop() if self._spares else await self._take_victim(path)
                backend = await (self._load(path) if spare is None else self._reload_spare(spare, path))
        finally:
            self._loading.pop(path, None)
        self._entries[path] = _Entry(backend)
        self._entries.move_to_end(path)
        self.evict(keep=path)
        return backend

    async def _reload_spare(self, spare: B, path: Path) -> B:
        """Swap ``path`` into an idle engine; if that fails, keep the engine as a spare (once)."""
        try:
            backend = await self._reload(spare, path)
        except BaseException:
            if id(spare) in self._suspect:  # failed twice in a row: the engine itself is broken
                self._suspect.discard(id(spare))
                self._close_later(spare)
            else:
                self._suspect.add(id(spare))
                self._spares.append(spare)
            raise
        self._suspect.discard(id(spare))
        return backend

    @asynccontextmanager
    async def lease(self, path: Path) -> AsyncIterator[B]:
        """Use the backend of ``path`` (loading it if needed) until the block ends."""
        self._waiting[path] = self._waiting.get(path, 0) + 1
        try:
            await self.ensure(path)
            entry = self._entries[path]  # not evicted while we waited: see `evict`
            entry.leases += 1
        finally:
            self._waiting[path] -= 1
            if not self._waiting[path]:
                del self._waiting[path]
        try:
            yield entry.backend
        finally:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                if not entry.claimed:
                    self._schedule_close(path, entry)
            else:
                self.evict()

    def evict(self, keep: Path | None = None) -> None:
        """Retire least recently used, unpinned backends beyond the capacity (never ``keep``)."""
        live = [p for p, e in self._entries.items() if not e.retired]
        excess = len(live) - self.capacity
        for path in live:
            if excess <= 0:
                break
            if path in self.pinned or path == keep or path in self._waiting:
                continue
            entry = self._entries[path]
            entry.retired = True
            excess -= 1
            logger.info("evicting %s (%d request(s) still in flight)", path, entry.leases)
            if entry.leases == 0:
                self._schedule_close(path, entry)

    def _schedule_close(self, path: Path, entry: _Entry[B]) -> None:
        if self._entries.get(path) is entry:
            del self._entries[path]
        if len(self._spares) < self.max_spares:
            self._spares.append(entry.backend)  # kept warm for the next checkpoint
            return
        self._close_later(entry.backend)

    def _close_later(self, backend: B) -> None:
        task = asyncio.ensure_future(self._close(backend))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        """Close every backend (at shutdown)."""
        if self._replenishing is not None:
            self._replenishing.cancel()
        backends = [e.backend for e in self._entries.values()] + self._spares
        self._entries.clear()
        self._spares = []
        await asyncio.gather(*(self._close(b) for b in backends), *self._closing, return_exceptions=True)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("could not start a spare engine: %r", task.exception())
