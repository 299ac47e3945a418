"""Which checkpoints a run directory offers, and how model ids map onto them.

Model ids are ``<run>/round-N`` for every finished round of the served arm (``round-0`` is the
baseline, when it was evaluated) and ``<run>/latest`` for the highest one. A round counts once its
``<arm>/round-NNN/evaluate`` stage is done in ``state.json``: the driver marks it after the
checkpoint is complete. The run directory may be on object storage (``s3://``, ``gs://``): its
rounds are then URIs, materialized into the node's cache when first served. A folder that was
removed or damaged afterwards is caught by `checkpoint_problem` before an engine is spent on it;
an unreadable ``state.json`` keeps the last good catalog.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pyarrow.fs import FileType

from imm_ray.run import layout
from imm_ray.run.state import StateFormatError, read_state
from imm_ray.storage import StorageError, is_remote
from imm_ray.storage import resolve as resolve_location

logger = logging.getLogger(__name__)

_ROUND_ID = re.compile(r"^round-(?P<n>\d+)$")
LATEST = "latest"

Source = Path | str  # a local checkpoint folder, or the URI of one on object storage


def _remote(text: str) -> bool:
    try:
        return is_remote(text)
    except StorageError:  # another scheme: left to the loader to judge
        return False


class CatalogError(ValueError):
    """``state.json`` exists but cannot be read as a run's stage records."""


class UnknownModelError(LookupError):
    """A model id that the run does not (or not yet) offer."""

    def __init__(self, model: str, available: list[str]) -> None:
        self.model, self.available = model, available
        super().__init__(f"model {model!r} does not exist; available models: {', '.join(available) or 'none yet'}")


@dataclass(frozen=True)
class Catalog:
    """The rounds of one run: round number -> checkpoint folder."""

    run: str
    rounds: dict[int, Source] = field(default_factory=dict)

    @property
    def latest_round(self) -> int | None:
        return max(self.rounds) if self.rounds else None

    @property
    def latest_path(self) -> Source | None:
        n = self.latest_round
        return None if n is None else self.rounds[n]

    def model_id(self, n: int) -> str:
        return f"{self.run}/round-{n}"

    def ids(self) -> list[str]:
        """Every servable id, rounds in order, then ``latest``."""
        out = [self.model_id(n) for n in sorted(self.rounds)]
        return out + [f"{self.run}/{LATEST}"] if out else out

    def resolve(self, model: str) -> tuple[int, Source]:
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
    """Build the catalog from ``RUN_DIR/state.json`` (an empty one while the file is missing).

    Raises `CatalogError` when the file exists but is not a run state (it is written atomically,
    so that means something else wrote it).
    """
    remote = _remote(str(run_dir))
    root = Path(run_dir)
    name = run or (resolve_location(run_dir).name if remote else root.resolve().name)
    try:
        state = read_state(resolve_location(run_dir))
    except StateFormatError as exc:
        raise CatalogError(f"{layout.STATE} {exc}") from exc
    except OSError as exc:
        raise CatalogError(f"{layout.STATE} is unreadable ({type(exc).__name__})") from exc
    if state is None:
        return Catalog(name)
    rounds: dict[int, Source] = {}
    for n, info in state.done_rounds(arm).items():
        model = info.model
        if not isinstance(model, str):
            continue
        if _remote(model):
            rounds[n] = str(resolve_location(model))
        elif remote:
            rounds[n] = str(resolve_location(run_dir) / model)
        else:
            path = Path(model)
            rounds[n] = path if path.is_absolute() else (root / path).resolve()
    return Catalog(name, rounds)


class RunFollower:
    """Re-reads ``state.json`` when it changes; an unreadable one keeps the last good catalog."""

    def __init__(self, run_dir: str | Path, arm: str = "imm", run: str | None = None) -> None:
        self.run_dir, self.arm, self.run = run_dir, arm, run
        self._stamp: tuple[int, int] | None = None
        self.catalog = Catalog(run or (resolve_location(run_dir).name if _remote(str(run_dir))
                                       else Path(run_dir).resolve().name))
        self.problem: str | None = None  # why the last read of state.json failed
        self.poll()

    def poll(self) -> bool:
        """Refresh the catalog if ``state.json`` changed; return whether it did."""
        stamp = _state_stamp(self.run_dir)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = read_catalog(self.run_dir, self.arm, self.run)
        except CatalogError as exc:
            self.problem = str(exc)
            logger.warning("%s in %s; serving the rounds it listed before", exc, self.run_dir)
            return False
        self.problem = None
        changed = new != self.catalog
        self.catalog = new
        return changed


def _state_stamp(run_dir: str | Path) -> tuple[int, int] | None:
    """(modification time, size) of ``state.json``, None while it is missing."""
    if _remote(str(run_dir)):
        loc = resolve_location(run_dir) / layout.STATE
        info = loc.fs.get_file_info(loc.path)
        return None if info.type == FileType.NotFound else (info.mtime_ns or 0, info.size or 0)
    try:
        st = (Path(run_dir) / layout.STATE).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def folder_stamp(folder: Path) -> tuple | None:
    """What changes when a checkpoint folder's files change (None: the folder is gone)."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)))
    except (FileNotFoundError, NotADirectoryError):
        return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be loaded (missing config, missing/truncated/malformed safetensors), or
    None. Reads only headers; the reason names files relative to the folder."""
    from imm_ray.merge.safetensors_io import CheckpointReader

    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return "config.json is missing (a half-written checkpoint?)"
    except (OSError, ValueError) as exc:
        return f"config.json is unreadable ({type(exc).__name__})"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    try:
        CheckpointReader(folder).close()
    except Exception as exc:  # MergeError, or whatever a crafted header raises
        return str(exc).replace(f"{folder}/", "").replace(str(folder), "the folder") or type(exc).__name__
    return None
