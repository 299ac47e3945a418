"""The run directory: the single source of truth for a run, written atomically.

Layout::

    RUN_DIR/run.yaml                      resolved config
    RUN_DIR/state.json                    which stage of which round is done (+ its summary)
    RUN_DIR/metrics.jsonl                 one line per round and arm (derived from state.json)
    RUN_DIR/driver.log                    the driver's log, appended across resumes
    RUN_DIR/baseline/eval.json            the original model's evaluation (round 0)
    RUN_DIR/<arm>/round-NNN/samples.jsonl, accepted.jsonl, sft/, merged/, eval.json, eval_samples.jsonl
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines, atomically; return the number of rows."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def remove_path(path: Path) -> None:
    """Remove a file or folder if present (used to clear a stage's half-written output)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class RunLockedError(RuntimeError):
    """Another driver holds this run directory."""


class RunDir:
    """Paths of a run directory and its stage state."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "run.yaml"
        self.state_path = self.root / "state.json"
        self.metrics_path = self.root / "metrics.jsonl"
        self.log_path = self.root / "driver.log"
        self._lock_fh = None
        self.state: dict[str, Any] = self._load_state()

    # --- layout -----------------------------------------------------------------------------
    def round_dir(self, arm: str, round_idx: int) -> Path:
        """Folder of one round of one arm."""
        return self.root / arm / f"round-{round_idx:03d}"

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baseline"

    # --- locking ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take an exclusive lock so that two drivers never write the same run."""
        fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.close()
            raise RunLockedError(
                f"run directory {self.root} is in use by another driver; wait for it or use another --run-dir"
            ) from exc
        self._lock_fh = fh

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock`."""
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # --- stage state ------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"stages": {}}

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def stage(self, key: str) -> dict[str, Any] | None:
        """The record of a stage, or None if it never started."""
        return self.state["stages"].get(key)

    def is_done(self, key: str) -> bool:
        """Whether the stage ``key`` finished."""
        rec = self.stage(key)
        return bool(rec and rec.get("status") == "done")

    def mark_started(self, key: str) -> None:
        """Record that a stage started (a stage that started but did not finish is redone)."""
        self.state["stages"][key] = {"status": "started", "started_at": time.time()}
        self._save_state()

    def mark_done(self, key: str, seconds: float, info: dict[str, Any]) -> None:
        """Record atomically that a stage finished, with its duration and summary."""
        self.state["stages"][key] = {
            "status": "done",
            "seconds": round(seconds, 3),
            "finished_at": time.time(),
            "info": info,
        }
        self._save_state()
