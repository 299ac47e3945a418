"""A run directory on any storage: its config, stage state, metrics, lock and round folders."""

from __future__ import annotations

import fcntl
import json
import logging
import time
from pathlib import Path
from typing import IO, Any

from imm_ray.run import layout
from imm_ray.run.files import read_config_text
from imm_ray.run.state import RunState, StateFormatError, parse_state
from imm_ray.storage import conditional
from imm_ray.storage.checkpoints import is_published
from imm_ray.storage.fs import (
    Location,
    StorageError,
    StorageOptions,
    exists,
    list_names,
    read_bytes,
    remove_temp_siblings,
    resolve,
    write_bytes,
    write_jsonl,
    write_text,
)
from imm_ray.storage.lease import Lease, RunLockedError, force_unlock

logger = logging.getLogger(__name__)

# Names a start may leave in a run directory before run.yaml is written.
_PRE_CONFIG_NAMES = {layout.LOCAL_LOCK, layout.LEASE, layout.DRIVER_LOG}


class RunStateError(StorageError):
    """``state.json`` cannot be read; the message says how to recover."""


class RunDir:
    """One run directory (a local path or an object-store URI) and its stage state."""

    def __init__(self, root: str | Path | Location, options: StorageOptions | None = None,
                 lease_ttl_s: float = 60.0) -> None:
        self.root = resolve(root, options)
        if self.root.is_local:
            self.root.local_path().mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / layout.CONFIG
        self.state_path = self.root / layout.STATE
        self.backup_path = self.root / layout.STATE_BACKUP
        self.metrics_path = self.root / layout.METRICS
        self.log_path = self.root / layout.DRIVER_LOG
        self.lease_ttl_s = lease_ttl_s
        self._lock_fh: IO[str] | None = None
        self._lease: Lease | None = None
        self._state_version: str | None = None  # the ETag of state.json as last seen, once fenced
        self._fenced = False
        self.state: dict[str, Any] = self._load_state()

    # --- layout -----------------------------------------------------------------------------
    def round_dir(self, arm: str, round_idx: int) -> Location:
        """Folder of one round of one arm (round 0: the baseline folder)."""
        return self.root / layout.round_folder(arm, round_idx)

    @property
    def baseline_dir(self) -> Location:
        return self.root / layout.BASELINE

    def checkpoints(self) -> dict[tuple[str, int, str], Location]:
        """Every published ``<arm>/round-NNN/{sft,merged}`` checkpoint by (arm, round, kind).

        A folder without a valid manifest (an upload that never finished, a file missing or of
        another size) is not listed."""
        found = {}
        for arm in list_names(self.root):
            for folder in list_names(self.root / arm):
                round_idx = layout.parse_round_folder(folder)
                if round_idx is None:
                    continue
                for kind in (layout.SFT, layout.MERGED):
                    loc = self.round_dir(arm, round_idx) / kind
                    if is_published(loc):
                        found[(arm, round_idx, kind)] = loc
        return dict(sorted(found.items()))

    def check_is_run(self) -> None:
        """Refuse a folder that is neither empty nor an imm run (stages delete fixed names in it)."""
        if exists(self.config_path) or exists(self.state_path):
            return
        foreign = [n for n in list_names(self.root) if n not in _PRE_CONFIG_NAMES]
        if foreign:
            raise StorageError(
                f"{self.root} is not empty and holds no imm run ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): choose an empty or new --run-dir")

    # --- config -----------------------------------------------------------------------------
    def read_config_text(self) -> str | None:
        """``run.yaml`` as saved, or None before the first start."""
        return read_config_text(self.root)

    def write_config(self, text: str) -> None:
        write_text(self.config_path, text)

    # --- locking ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run, then remove the temporary files a killed holder's writes left beside its files.

        The lock makes this safe: no live writer of those files can exist while it is held."""
        self._take_lock()
        remove_temp_siblings(self.root, layout.LOCK_HOLDER_FILES)

    def _take_lock(self) -> None:
        """An fcntl lock on a local disk, a heartbeat lease on object storage."""
        if self.root.is_local:
            fh = open(self.root.local_path() / layout.LOCAL_LOCK, "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                fh.close()
                raise RunLockedError(
                    f"run directory {self.root} is in use by another driver; wait for it or use another --run-dir"
                ) from exc
            self._lock_fh = fh
            return
        self._lease = Lease(self.root / layout.LEASE, ttl_s=self.lease_ttl_s)
        self._lease.acquire(min_generation=int(self.state.get("lease_generation", 0)))
        if self._lease.conditional:
            try:
                self._fence(self._lease.generation)
            except BaseException:
                self.unlock()
                raise

    def _fence(self, generation: int) -> None:
        """Stamp ``state.json`` with this lease's ``generation``; from then on it is replaced only if
        it is still the version this driver wrote, so a stale driver's write fails instead of landing."""
        for _ in range(3):  # a stale holder's last write may land between the read and the stamp
            found = conditional.get(self.state_path)
            self.state = self._parse_state(found.data) if found else {"stages": {}}
            self._state_version = found.etag if found else None
            if int(self.state.get("lease_generation", 0)) >= generation:
                raise RunLockedError(f"{self.state_path} was written by a newer driver (generation "
                                     f"{self.state['lease_generation']}): this driver stops")
            self.state["lease_generation"] = generation
            self._fenced = True
            try:
                self._save_state()
                return
            except RunLockedError:
                continue
        raise RunLockedError(f"{self.state_path} keeps changing under this driver: another driver writes it")

    def check_lock(self) -> None:
        """Raise when the lease was lost (expired or broken by --force-unlock while we ran)."""
        if self._lease is not None and self._lease.lost:
            raise RunLockedError(f"this driver lost the lease on {self.root} to another driver: stopping")

    def unlock(self) -> None:
        """Release what :meth:`lock` took."""
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self._fenced = False

    def force_unlock(self) -> str | None:
        """Break the lease of another driver (object storage); return whom it broke."""
        if self.root.is_local:
            return None  # the kernel releases an fcntl lock when its holder dies
        return force_unlock(self.root / layout.LEASE)

    # --- stage state ------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            raw = read_bytes(self.state_path)
        except FileNotFoundError:
            return {"stages": {}}
        return self._parse_state(raw)

    def _parse_state(self, raw: bytes) -> dict[str, Any]:
        try:
            return parse_state(raw)
        except StateFormatError as exc:
            raise RunStateError(
                f"{self.state_path} is corrupt ({exc}); restore the copy kept beside it "
                f"({self.backup_path} -> {self.state_path}) or start over in a new --run-dir") from None

    def _save_state(self) -> None:
        data = (json.dumps(self.state, indent=2) + "\n").encode("utf-8")
        if self._fenced:
            try:
                self._state_version = conditional.put(self.state_path, data, self._state_version)
            except conditional.PreconditionFailed:
                raise RunLockedError(f"{self.state_path} was changed by another driver since this one wrote it: "
                                     "this driver lost the run and stops") from None
        else:
            write_bytes(self.state_path, data)
        write_bytes(self.backup_path, data)

    def view(self) -> RunState:
        """A read-only view of the state as last saved or loaded."""
        return RunState.from_json(self.state)

    def done_keys(self) -> list[str]:
        """Keys of the finished stages, in the order they finished."""
        return [k for k, rec in self.state["stages"].items() if rec.get("status") == "done"]

    def stage(self, key: str) -> dict[str, Any] | None:
        """The record of a stage, or None if it never started."""
        return self.state["stages"].get(key)

    def is_done(self, key: str) -> bool:
        """Whether the stage ``key`` finished."""
        rec = self.stage(key)
        return bool(rec and rec.get("status") == "done")

    def mark_started(self, key: str) -> None:
        """Record that a stage started (a stage that started but did not finish is redone)."""
        self.check_lock()
        self.state["stages"][key] = {"status": "started", "started_at": time.time()}
        self._save_state()

    def mark_done(self, key: str, seconds: float, info: dict[str, Any]) -> None:
        """Record atomically that a stage finished, with its duration and summary."""
        self.check_lock()
        self.state["stages"][key] = {
            "status": "done",
            "seconds": round(seconds, 3),
            "finished_at": time.time(),
            "info": info,
        }
        self._save_state()

    def pin_inputs(self, inputs: dict[str, str]) -> None:
        """Record the checksums of the run's inputs; refuse a resume whose inputs changed.

        Nothing is pinned until a stage has finished: before that the inputs may change freely.
        """
        old = self.state.get("inputs")
        if old and self.done_keys():
            changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            if changed:
                raise StorageError(
                    f"the inputs of {self.root} changed since its stages ran ({', '.join(changed)}): "
                    "restore the original model and data files, or start a new --run-dir")
        if old != inputs:
            self.state["inputs"] = inputs
            self._save_state()

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        write_jsonl(self.metrics_path, rows)
