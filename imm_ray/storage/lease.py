"""A run lock on object storage: a lease object renewed by a heartbeat, taken over after expiry.

Object stores have no ``flock``. The driver writes ``.lease.json`` (holder, host, pid, expiry),
reads it back after a short settle time to detect a concurrent writer, and renews it from a
daemon thread every third of its time to live. A second driver is refused while the lease is
live; a driver killed with SIGKILL stops renewing, so the next one takes the lease once it has
expired. ``force_unlock`` removes a live lease (the caller says whom it breaks).

Limitation: without conditional writes (pyarrow exposes none), two drivers starting within the
settle time of each other could both read an absent lease; the read-back catches all but
writes that land more than ``settle_s`` apart.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from imm_ray.errors import UserError
from imm_ray.storage.fs import Location, delete, read_json, write_json

logger = logging.getLogger(__name__)


class RunLockedError(UserError):
    """Another driver holds this run directory."""


def describe(lease: dict[str, Any]) -> str:
    """Who holds a lease and until when, in words."""
    left = lease.get("expires_at", 0) - time.time()
    state = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
    return f"driver pid {lease.get('pid')} on {lease.get('host')} (holder {lease.get('holder')}, {state})"


def read_lease(loc: Location) -> dict[str, Any] | None:
    """The lease at ``loc``, or None when there is none (an unreadable lease counts as none)."""
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
        self.settle_s = settle_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "renewed_at": now, "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s}

    def acquire(self) -> None:
        """Take the lease or raise RunLockedError naming its live holder."""
        current = read_lease(self.loc)
        if current and current["holder"] != self.holder and current.get("expires_at", 0) > time.time():
            raise RunLockedError(
                f"run directory {self.loc.parent} is in use by {describe(current)}; wait for it, or if "
                "that driver is gone wait for the lease to expire or run again with --force-unlock")
        if current:
            logger.warning("taking over the expired lease of %s", describe(current))
        write_json(self.loc, self._record())
        time.sleep(self.settle_s)
        winner = read_lease(self.loc)
        if not winner or winner["holder"] != self.holder:
            raise RunLockedError(f"run directory {self.loc.parent} was taken at the same moment by "
                                 f"{describe(winner) if winner else 'another driver'}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="imm-run-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            current = read_lease(self.loc)
            if current is not None and current["holder"] != self.holder:
                logger.error("the run lease was taken by %s: this driver must stop", describe(current))
                self.lost = True
                return
            try:
                write_json(self.loc, self._record())
            except OSError as exc:  # keep trying until the lease expires
                logger.warning("could not renew the run lease: %s", exc)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = read_lease(self.loc)
        if current and current["holder"] == self.holder:
            delete(self.loc)


def force_unlock(loc: Location) -> str | None:
    """Remove the lease at ``loc``; return who held it (None when there was none)."""
    current = read_lease(loc)
    delete(loc)
    return describe(current) if current else None
