"""Public benchmark files shipped in the package, so the demo and the tests need no data folder
and no hub (licences and sources: README.md and each folder's LICENSE/NOTICE here).

A bundled file is a split's first rows (or all of them) unchanged, so its problems and ids equal
the full set's for any window of rows inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BundledSplit", "BUNDLED_SPLITS", "bundled_split"]

_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BundledSplit:
    """The bundled copy of one split: <folder>/<split>.jsonl with the real split's first `rows` rows."""

    folder: str
    split: str
    rows: int
    full_rows: int

    @property
    def path(self) -> Path:
        return _ROOT / self.folder / f"{self.split}.jsonl"

    def holds(self, offset: int, limit: int | None) -> bool:
        """Whether rows [offset, offset + limit) of the real split (to its end when limit is None)
        are all in the bundled copy."""
        stop = self.full_rows if limit is None else min(offset + limit, self.full_rows)
        return stop <= self.rows


BUNDLED_SPLITS: tuple[BundledSplit, ...] = (
    BundledSplit("gsm8k", "train", rows=1000, full_rows=7473),
    BundledSplit("gsm8k", "test", rows=1319, full_rows=1319),
    BundledSplit("svamp", "test", rows=1000, full_rows=1000),
)


def bundled_split(folder: str, split: str) -> BundledSplit | None:
    """The bundled copy of <folder>/<split>, or None when the package has none."""
    return next((b for b in BUNDLED_SPLITS if (b.folder, b.split) == (folder, split)), None)
