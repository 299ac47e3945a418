"""Compare checkpoints by their bytes in tests (shared by the local, S3 and multi-node round tests)."""

from __future__ import annotations

import json
from pathlib import Path


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """The bytes of a checkpoint's files; the merge provenance by content (it names its input folders)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    if "merge_provenance.json" in files:
        provenance = json.loads(files.pop("merge_provenance.json"))
        for entry in (provenance["anchor"], *provenance["models"]):
            entry.pop("path")
        files["merge_provenance.json"] = json.dumps(provenance, sort_keys=True).encode()
    return files
