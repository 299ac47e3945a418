"""Which checkpoints a run directory offers, and how model ids map onto them.

Model ids are ``<run>/round-N`` for every finished round of the served arm (``round-0`` is the
baseline, when it was evaluated) and ``<run>/latest`` for the highest one. A round counts once its
``<arm>/round-NNN/evaluate`` stage is done in ``state.json``: the driver marks it after the
checkpoint is complete, so a half-written folder is never served.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_ROUND_KEY = re.compile(r"^(?P<arm>[^/]+)/round-(?P<n>\d+)/evaluate$")
_ROUND_ID = re.compile(r"^round-(?P<n>\d+)$")
LATEST = "latest"


class UnknownModelError(LookupError):
    """A model id that the run does not (or not yet) offer."""

    def __init__(self, model: str, available: list[str]) -> None:
        self.model, self.available = model, available
        super().__init__(f"model {model!r} does not exist; available models: {', '.join(available) or 'none yet'}")


@dataclass(frozen=True)
class Catalog:
    """The rounds of one run: round number -> checkpoint folder."""

    run: str
    rounds: dict[int, Path] = field(default_factory=dict)

    @property
    def latest_round(self) -> int | None:
        return max(self.rounds) if self.rounds else None

    @property
    def latest_path(self) -> Path | None:
        n = self.latest_round
        return None if n is None else self.rounds[n]

    def model_id(self, n: int) -> str:
        return f"{self.run}/round-{n}"

    def ids(self) -> list[str]:
        """Every servable id, rounds in order, then ``latest``."""
        out = [self.model_id(n) for n in sorted(self.rounds)]
        return out + [f"{self.run}/{LATEST}"] if out else out

    def resolve(self, model: str) -> tuple[int, Path]:
        """Map a model id onto (round, folder) or raise `UnknownModelError`."""
        prefix, _, name = model.rpartition("/")
        if prefix == self.run:
            if name == LATEST and self.rounds:
                n = self.latest_round
                return n, self.rounds[n]
            m = _ROUND_ID.match(name)
            if m and int(m["n"]) in self.rounds:
                return int(m["n"]), self.rounds[int(m["n"])]
        raise UnknownModelError(model, self.ids())


def read_catalog(run_dir: str | Path, arm: str = "imm", run: str | None = None) -> Catalog:
    """Build the catalog from ``RUN_DIR/state.json`` (an empty one while the file is missing)."""
    root = Path(run_dir)
    name = run or root.resolve().name
    state_path = root / "state.json"
    try:
        stages = json.loads(state_path.read_text()).get("stages", {})
    except FileNotFoundError:
        return Catalog(name)
    except (OSError, ValueError) as exc:  # written atomically, so this is a real problem
        logger.warning("cannot read %s: %s", state_path, exc)
        return Catalog(name)
    rounds: dict[int, Path] = {}
    for key, rec in stages.items():
        if rec.get("status") != "done" or not (rec.get("info") or {}).get("model"):
            continue
        m = _ROUND_KEY.match(key)
        if key == "baseline/evaluate":
            n = 0
        elif m and m["arm"] == arm:
            n = int(m["n"])
        else:
            continue
        path = Path(rec["info"]["model"])
        if not path.is_absolute():
            path = (root / path).resolve()
        rounds[n] = path
    return Catalog(name, rounds)


class RunFollower:
    """Re-reads ``state.json`` when its modification time changes; tells whether the catalog moved."""

    def __init__(self, run_dir: str | Path, arm: str = "imm", run: str | None = None) -> None:
        self.run_dir, self.arm, self.run = Path(run_dir), arm, run
        self._stamp: tuple[int, int] | None = None
        self.catalog = read_catalog(self.run_dir, arm, run)

    def poll(self) -> bool:
        """Refresh the catalog if ``state.json`` changed; return whether it did."""
        try:
            st = (self.run_dir / "state.json").stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        new = read_catalog(self.run_dir, self.arm, self.run)
        changed = new != self.catalog
        self.catalog = new
        return changed
