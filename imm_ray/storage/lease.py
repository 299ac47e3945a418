"""A run lock on object storage: a lease object renewed by a heartbeat, taken over after expiry.

Object stores have no ``flock``. The driver writes ``.lease.json`` (holder, host, pid, generation,
time to live) and renews it from a daemon thread every third of its time to live. A lease is live
for ``ttl_s`` after its last write, judged by the store's clock where the store says it; a driver
killed with SIGKILL stops renewing, so the next one takes the lease once it has expired.
``force_unlock`` removes a live lease (the caller says whom it breaks).

On S3 every write is conditional (:mod:`imm_ray.storage.conditional`): the lease is created only
if there is none, taken over only if it is still the expired version that was read, and renewed
only if it is still the version this driver wrote. Of two drivers starting together exactly one
wins, and a heartbeat never overwrites another holder. Each holder's generation is one above the
last one's; the run directory stamps ``state.json`` with it so that a stale holder's writes fail.

Stores without conditional writes here (``gs://``) fall back to write, wait ``settle_s``, read
back: that catches all but concurrent writes that land more than ``settle_s`` apart, and expiry
is judged by the clocks of the drivers' machines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from imm_ray.errors import UserError
from imm_ray.storage import conditional
from imm_ray.storage.conditional import CLOCK_RESOLUTION_S, PreconditionFailed
from imm_ray.storage.fs import Location, delete, read_json, write_json

logger = logging.getLogger(__name__)


class RunLockedError(UserError):
    """Another driver holds this run directory."""


@dataclass(frozen=True)
class Seen:
    """A lease as read: its record, its version and its age in seconds since its last write."""

    record: dict[str, Any]
    version: str
    age_s: float

    @property
    def left_s(self) -> float:
        """Seconds until it expires (negative: expired that long ago; -inf without a time to live)."""
        ttl = self.record.get("ttl_s")
        if not isinstance(ttl, (int, float)):  # not a lease record: nobody's, expired
            return -math.inf
        return ttl + CLOCK_RESOLUTION_S - self.age_s

    def describe(self) -> str:
        """Who holds the lease and until when, in words."""
        r, left = self.record, self.left_s
        state = (f"expires in {left:.0f} s" if left >= 0 else "unreadable, counts as expired" if left == -math.inf
                 else f"expired {-left:.0f} s ago")
        return (f"driver pid {r.get('pid')} on {r.get('host')} (holder {r.get('holder')}, "
                f"generation {r.get('generation', 0)}, {state})")


class _ConditionalStore:
    """The lease on a store with conditional writes: versions are ETags, ages the store's."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc

    def read(self) -> Seen | None:
        found = conditional.get(self.loc)
        if found is None:
            return None
        try:
            record = json.loads(found.data)
        except ValueError:  # unreadable: an expired lease of nobody, taken over like one
            record = {}
        return Seen(record if isinstance(record, dict) else {}, found.etag, found.age_s)

    def write(self, record: dict[str, Any], version: str | None) -> str:
        return conditional.put(self.loc, json.dumps(record, indent=2).encode(), version)


class _ReadBackStore:
    """The lease on a store without conditional writes: compare by reading, write, and read back
    after ``settle_s`` to catch a concurrent writer; versions and ages come from the record."""

    def __init__(self, loc: Location, settle_s: float) -> None:
        self.loc = loc
        self.settle_s = settle_s

    def read(self) -> Seen | None:
        record = read_lease(self.loc)
        if record is None:
            return None
        renewed = float(record.get("renewed_at", 0))
        return Seen(record, f"{record['holder']}@{renewed!r}", time.time() - renewed)

    def write(self, record: dict[str, Any], version: str | None) -> str:
        seen = self.read()
        if (seen.version if seen else None) != version:
            raise PreconditionFailed(f"{self.loc} was written by another writer")
        write_json(self.loc, record)
        time.sleep(self.settle_s)
        back = self.read()
        if back is None or back.record["holder"] != record["holder"]:
            raise PreconditionFailed(f"{self.loc} was written by another writer")
        return back.version


def read_lease(loc: Location) -> dict[str, Any] | None:
    """The lease record at ``loc``, or None when there is none (an unreadable lease counts as none)."""
    try:
        lease = read_json(loc)
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) and "holder" in lease else None


class Lease:
    """A renewable lease on one object (``ttl_s`` seconds, renewed every ``ttl_s / 3``)."""

    def __init__(self, loc: Location, ttl_s: float = 60.0, settle_s: float = 1.0) -> None:
        self.loc = loc
        self.ttl_s = ttl_s
        self.store = _ConditionalStore(loc) if conditional.supports(loc) else _ReadBackStore(loc, settle_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.generation = 0
        self.lost = False
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def conditional(self) -> bool:
        """Whether the store refuses a stale writer by itself (conditional writes)."""
        return isinstance(self.store, _ConditionalStore)

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "generation": self.generation, "renewed_at": now, "expires_at": now + self.ttl_s,
                "ttl_s": self.ttl_s}

    def acquire(self, min_generation: int = 0) -> None:
        """Take the lease or raise RunLockedError naming its holder; this holder's generation is
        above both the last holder's and ``min_generation`` (the last one ``state.json`` saw)."""
        seen = self.store.read()
        if seen is not None and seen.left_s >= 0:
            raise RunLockedError(
                f"run directory {self.loc.parent} is in use by {seen.describe()}; wait for it, or if "
                "that driver is gone wait for the lease to expire or run again with --force-unlock")
        if seen is not None:
            logger.warning("taking over the expired lease of %s", seen.describe())
        self.generation = max(min_generation, int(seen.record.get("generation", 0)) if seen else 0) + 1
        try:
            self._version = self.store.write(self._record(), seen.version if seen else None)
        except PreconditionFailed:
            winner = self.store.read()
            raise RunLockedError(f"run directory {self.loc.parent} was taken at the same moment by "
                                 f"{winner.describe() if winner else 'another driver'}") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="imm-run-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._version = self.store.write(self._record(), self._version)
            except PreconditionFailed:
                seen = self.store.read()
                logger.error("the run lease was taken by %s: this driver must stop",
                             seen.describe() if seen else "--force-unlock (it was removed)")
                self.lost = True
                return
            except OSError as exc:  # keep trying until the lease expires
                logger.warning("could not renew the run lease: %s", exc)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = self.store.read()
        if current and current.version == self._version:
            delete(self.loc)


def force_unlock(loc: Location) -> str | None:
    """Remove the lease at ``loc``; return who held it (None when there was none)."""
    store = _ConditionalStore(loc) if conditional.supports(loc) else _ReadBackStore(loc, 0.0)
    current = store.read()
    delete(loc)
    return current.describe() if current else None
