"""Checkpoint folders: published with a manifest written last, materialized into a node-local cache.

A checkpoint is a folder with ``manifest.json`` (size and sha256 of every other file). On a
local disk it is built in a temporary sibling and renamed into place; on object storage every
file is uploaded first and the manifest last. A folder without a valid manifest does not exist
for readers: it is not listed (:func:`published_manifest`) and not loaded (:func:`materialize`).

:func:`materialize` gives a node a local copy of a checkpoint on object storage: a folder in the
node-local cache named by the manifest's hash, filled under a file lock, verified against the
manifest, and refilled when a file in it was corrupted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

from imm_ray.storage.fs import (
    Location,
    StorageError,
    default_mode,
    default_options,
    delete,
    download_file,
    exists,
    list_files,
    make_temp_dir,
    read_bytes,
    remove_temp_siblings,
    resolve,
    temp_prefix,
    upload_file,
    write_bytes,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Test hook: seconds to sleep after each file uploaded to object storage by publish_dir, so a test
# can kill the writer in the middle of an upload (tests/integration/test_s3_resume.py). Never set
# outside tests.
UPLOAD_DELAY_ENV = "IMM_TEST_UPLOAD_DELAY_S"
_WORK_DIR = re.compile(r"^.+\.tmp-(?P<pid>\d+)-[^/]+$")  # work_dir_for's folders in the scratch space


class CheckpointError(StorageError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def default_cache_dir() -> Path:
    """The imm-ray cache folder: ``$IMM_CACHE_DIR``, else ``~/.cache/imm-ray``."""
    env = os.environ.get("IMM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imm-ray"


def node_cache_dir() -> Path:
    """Where this node keeps materialized checkpoints: ``$IMM_NODE_CACHE_DIR``, else the cache folder."""
    env = os.environ.get("IMM_NODE_CACHE_DIR")
    return Path(env).expanduser() if env else default_cache_dir() / "materialized"


def scratch_dir() -> Path:
    """This node's scratch space for outputs being built: ``$IMM_SCRATCH_DIR``, else the temp dir."""
    env = os.environ.get("IMM_SCRATCH_DIR")
    return Path(env).expanduser() if env else Path(tempfile.gettempdir()) / "imm-scratch"


def work_dir_for(target: str | Path | Location) -> Path:
    """A fresh local folder to build the output ``target`` in before :func:`publish_dir`.

    For a local output it is a temporary sibling (``.NAME.tmp-*``: renamed into place, and
    cleared by :func:`clear_output` after a kill); for object storage, ``NAME.tmp-PID-*`` in
    :func:`scratch_dir`, where the folders of writers that died (their PID gone) are removed first.
    """
    loc = resolve(target)
    if loc.is_local:
        return make_temp_dir(loc.parent.local_path(), temp_prefix(loc.name))
    root = scratch_dir()
    _remove_dead_work_dirs(root)
    return make_temp_dir(root, f"{loc.name}.tmp-{os.getpid()}-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_dead_work_dirs(root: Path) -> None:
    """Remove work folders in this node's scratch whose writer was killed (the PID in their name is gone)."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        match = _WORK_DIR.match(folder.name)
        if match and not _pid_alive(int(match["pid"])):
            logger.info("removing %s left in the scratch space by a killed writer", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _files_checksum(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def folder_checksum(folder: str | Path) -> str:
    """One sha256 for the files of a local folder (from its manifest when it has one)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = build_manifest(folder)["files"]
    return _files_checksum(files)


def checkpoint_checksum(target: str | Path | Location) -> str:
    """:func:`folder_checksum` of a checkpoint, wherever it is: a published one's comes from its
    manifest, so nothing but the manifest is downloaded."""
    loc = resolve(target)
    if loc.is_local:
        return folder_checksum(loc.local_path())
    manifest = published_manifest(loc)
    if manifest is None:
        raise CheckpointError(f"{loc} is not a published checkpoint (no complete {MANIFEST_NAME})")
    return _files_checksum(manifest["files"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME}


def build_manifest(folder: Path, known_sha256: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest of a local folder: size and sha256 of every file but the manifest.

    ``known_sha256`` (by relative path) are digests the caller computed from these very files; only
    the other files are hashed."""
    known = known_sha256 or {}
    return {"version": 1, "files": {rel: {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size}
                                    for rel, p in _local_files(folder).items()}}


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/manifest.json`` for the files now in the local ``folder``; return it."""
    folder = Path(folder)
    manifest = build_manifest(folder)
    write_bytes(folder / MANIFEST_NAME, _manifest_bytes(manifest))
    return manifest


def verify_manifest(folder: str | Path, manifest: dict[str, Any] | None = None) -> bool:
    """True when the local ``folder`` holds exactly the files of its manifest, with matching sha256."""
    folder = Path(folder)
    try:
        listed = manifest["files"] if manifest else json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: missing or unreadable %s", folder, MANIFEST_NAME)
        return False
    present = _local_files(folder)
    if set(present) != set(listed):
        logger.warning("%s: files differ from the manifest (missing %s, extra %s)", folder,
                       sorted(set(listed) - set(present)), sorted(set(present) - set(listed)))
        return False
    for rel, path in present.items():
        entry = listed[rel]
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            logger.warning("%s: %s does not match the manifest", folder, rel)
            return False
    return True


def published_manifest(target: str | Path | Location) -> dict[str, Any] | None:
    """The manifest of a published checkpoint, or None when it is missing, unreadable, or a listed
    file is absent or of another size (a cheap check: one listing, no hashing)."""
    loc = resolve(target)
    try:
        manifest = json.loads(read_bytes(loc / MANIFEST_NAME))
        listed = manifest["files"]
        present = list_files(loc)
        if all(present.get(rel) == entry["size"] for rel, entry in listed.items()):
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def is_published(target: str | Path | Location) -> bool:
    """Whether ``target`` is a complete published checkpoint."""
    return published_manifest(target) is not None


def clear_output(target: str | Path | Location) -> None:
    """Remove an output and the temporary siblings a killed writer of it left behind."""
    loc = resolve(target)
    if exists(loc.parent):
        remove_temp_siblings(loc.parent, [loc.name])
    delete(loc)


def publish_dir(src: str | Path, dest: str | Path | Location, move: bool = False,
                known_sha256: Mapping[str, str] | None = None) -> Location:
    """Publish the local folder ``src`` as the checkpoint ``dest`` (which must not exist yet).

    On a local disk: ``src`` itself (``move``: it then gets the manifest and is renamed into
    place) or a copy of it, with the manifest, renamed into place. On object storage: every file
    uploaded, the manifest last. ``src`` is left as it is unless ``move``. ``known_sha256``: digests
    of files of ``src`` (by relative path) that the writer computed as it wrote them, used in the
    manifest instead of hashing those files again. Returns ``dest``.
    """
    src, loc = Path(src), resolve(dest)
    if is_published(loc) or (loc.is_local and exists(loc)):
        raise CheckpointError(f"{loc} already exists (refusing to overwrite)")
    manifest = build_manifest(src, known_sha256)
    if loc.is_local:
        dst = loc.local_path()
        staging = src if move else make_temp_dir(dst.parent, temp_prefix(dst.name))
        try:
            if not move:
                shutil.copytree(src, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST_NAME))
            staging.chmod(default_mode(folder=True))
            write_bytes(staging / MANIFEST_NAME, _manifest_bytes(manifest))
            os.rename(staging, dst)
        finally:
            if not move:
                shutil.rmtree(staging, ignore_errors=True)
        return loc
    # Objects an interrupted upload left here are overwritten or, if not listed in the manifest,
    # ignored by readers; deleting them is the driver's job (clear_output before the stage).
    delay = float(os.environ.get(UPLOAD_DELAY_ENV) or 0)
    for rel in manifest["files"]:
        upload_file(src / rel, loc / rel)
        if delay:
            time.sleep(delay)
    write_bytes(loc / MANIFEST_NAME, _manifest_bytes(manifest))
    if move:
        shutil.rmtree(src, ignore_errors=True)
    logger.info("published %s (%d files)", loc, len(manifest["files"]))
    return loc


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes of this node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_stats(folder: Path) -> dict[str, list[int]]:
    """Size and modification time (ns) of every file of ``folder`` but the manifest."""
    return {rel: [st.st_size, st.st_mtime_ns] for rel, st in
            ((rel, p.stat()) for rel, p in _local_files(folder).items())}


def _write_stamp(stamp: Path, folder: Path) -> None:
    """Record that ``folder`` was just verified against its manifest, as its files' stats."""
    write_bytes(stamp, json.dumps(_file_stats(folder)).encode("utf-8"))


def _stamp_matches(stamp: Path, folder: Path) -> bool:
    """Whether ``folder``'s files are exactly those, unchanged (size and mtime), that ``stamp``
    recorded when they were verified: a cache hit then needs no hashing."""
    try:
        return json.loads(stamp.read_bytes()) == _file_stats(folder)
    except (OSError, ValueError):
        return False


_held: dict[Path, IO[bytes]] = {}  # cache entries this process holds (a shared flock each, until it exits)


def _hold(root: Path, key: str) -> None:
    """Hold the cache entry ``key`` for the rest of this process (the kernel drops the lock when it
    exits, killed or not): :func:`evict` leaves an entry alone while any process holds it."""
    path = root / f".{key}.hold"
    if path not in _held:
        handle = open(path, "a+b")
        fcntl.flock(handle, fcntl.LOCK_SH)
        _held[path] = handle


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def evict(root: Path, max_bytes: int, keep: str, incoming: int = 0) -> list[str]:
    """Remove the least recently used entries of the node cache ``root`` (by their last hit) that no
    process holds, until they and ``incoming`` more bytes fit in ``max_bytes``; ``keep`` is never
    removed. Returns the keys removed."""
    entries = [(_last_used(root, d.name), d.name, _folder_bytes(d)) for d in root.iterdir()
               if d.is_dir() and not d.name.startswith(".")]
    total = incoming + sum(size for _, _, size in entries)
    removed = []
    for _, key, size in sorted(entries):
        if total <= max_bytes:
            break
        if key == keep:
            continue
        with open(root / f".{key}.hold", "a+b") as hold, open(root / f".{key}.lock", "a+b") as fill:
            try:
                fcntl.flock(hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fill, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use, or being filled or verified
            shutil.rmtree(root / key)
            (root / f".{key}.verified").unlink(missing_ok=True)
        total -= size
        removed.append(key)
    if removed:
        logger.info("node cache %s: evicted %s (least recently used, over %.1f GB)", root, removed, max_bytes / 1e9)
    if total > max_bytes:
        logger.warning("node cache %s needs %.1f GB, over its bound of %.1f GB (storage.node_cache_gb): the rest is "
                       "in use", root, total / 1e9, max_bytes / 1e9)
    return removed


def _last_used(root: Path, key: str) -> float:
    """When the entry ``key`` was last materialized (its stamp's modification time; 0 if none)."""
    try:
        return (root / f".{key}.verified").stat().st_mtime
    except OSError:
        return 0.0


# Weight files by suffix: what ``materialize(..., weights=False)`` leaves out.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def materialize(target: str | Path | Location, cache_dir: str | Path | None = None,
                weights: bool = True) -> Path:
    """A local folder with the checkpoint ``target``.

    A local folder is returned as it is. A checkpoint on object storage is copied once per node
    into ``cache_dir`` (default :func:`node_cache_dir`) under the hash of its manifest, verified
    against that manifest (sha256 of every file), and copied again when the cached copy no longer
    matches. A later hit hashes nothing while every file keeps the size and modification time it
    had when it was verified (recorded beside the copy); otherwise it is verified again. Raises
    CheckpointError when the checkpoint has no manifest or its bytes do not match it.

    ``weights=False``: only the files that are not weights (config, tokenizer, generation
    config), for a process that tokenizes but loads no model; a local folder is returned whole.
    """
    return materialize_verified(target, cache_dir, weights)[0]


def materialize_verified(target: str | Path | Location, cache_dir: str | Path | None = None,
                         weights: bool = True) -> tuple[Path, dict[Path, str]]:
    """:func:`materialize`, and the sha256 of every file it verified by local path (a local folder
    is not verified: none), for callers that would otherwise hash the same files again."""
    loc = resolve(target)
    if loc.is_local:
        path = loc.local_path()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        return path, {}
    try:
        raw = read_bytes(loc / MANIFEST_NAME)
        manifest = json.loads(raw)
        listed = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{loc} is not a published checkpoint (no {MANIFEST_NAME}): "
                              "its upload never finished") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{loc}/{MANIFEST_NAME} is unreadable ({exc})") from exc
    root = Path(cache_dir).expanduser() if cache_dir is not None else node_cache_dir()
    key = hashlib.sha256(raw).hexdigest()[:32]
    if not weights:
        listed = {rel: entry for rel, entry in listed.items() if not rel.endswith(WEIGHT_SUFFIXES)}
        manifest = {**manifest, "files": listed}
        raw, key = _manifest_bytes(manifest), f"{key}-meta"
    target_dir = root / key
    verified = {target_dir / rel: entry["sha256"] for rel, entry in listed.items()}
    stamp = root / f".{key}.verified"
    with file_lock(root / f".{key}.lock"):
        _hold(root, key)
        if target_dir.is_dir():
            if _stamp_matches(stamp, target_dir):
                os.utime(stamp)  # a hit: most recently used
                return target_dir, verified
            if verify_manifest(target_dir, manifest):
                _write_stamp(stamp, target_dir)
                return target_dir, verified
            logger.warning("cached copy %s of %s is corrupt: fetching it again", target_dir, loc)
            shutil.rmtree(target_dir)
        evict(root, int(default_options().node_cache_gb * 1e9), keep=key,
              incoming=sum(int(entry["size"]) for entry in listed.values()))
        tmp = make_temp_dir(root, temp_prefix(key))
        try:
            for rel in listed:
                download_file(loc / rel, tmp / rel)
            (tmp / MANIFEST_NAME).write_bytes(raw)
            if not verify_manifest(tmp, manifest):
                raise CheckpointError(f"{loc}: the stored files do not match its {MANIFEST_NAME}; "
                                      "publish the checkpoint again")
            os.rename(tmp, target_dir)
            _write_stamp(stamp, target_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("materialized %s into %s", loc, target_dir)
    return target_dir, verified
