"""Appending one JSON line to a file that several writers share (the web page's votes).

Its own module because it needs both the file layer (``fs``) and the conditional writes built on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imm_ray.storage import conditional
from imm_ray.storage.fs import Location, StorageError, default_mode, resolve


def append_line(loc: str | Path | Location, row: dict[str, Any], attempts: int = 20) -> None:
    """Append ``row`` as one JSON line without losing a concurrent writer's line.

    Locally one ``O_APPEND`` write of the whole line (concurrent appends never interleave); on S3 a
    read, then a write only if the object is still the version read, retried when another writer got
    there first (each lost attempt means another writer's line landed). Other object stores have no
    conditional write here: StorageError."""
    loc = resolve(loc)
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    if loc.is_local:
        path = loc.local_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, default_mode())
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    if not conditional.supports(loc):
        raise StorageError(f"cannot append to {loc} safely: {loc.scheme}:// has no conditional writes here")
    for _ in range(attempts):
        found = conditional.get(loc)
        try:
            conditional.put(loc, (found.data if found else b"") + line, found.etag if found else None)
            return
        except conditional.PreconditionFailed:
            continue
    raise StorageError(f"{loc} kept changing under {attempts} appends: too many concurrent writers")
