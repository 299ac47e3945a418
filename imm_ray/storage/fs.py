"""Where a run lives: a local path, ``file://``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

Everything goes through :mod:`pyarrow.fs`. S3 credentials, region and endpoint come from the
standard AWS environment variables, as the AWS CLI reads them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL``); :class:`StorageOptions` (the config's
``storage`` section) overrides the endpoint and region. GCS uses Google's default credentials, or
the emulator that ``STORAGE_EMULATOR_HOST`` names.

Writes are atomic for readers: a local file is written to a temporary sibling and renamed (with
the permissions the process umask gives, like any other tool); an object is one PUT (a multipart
upload for large ones), visible only once complete, so object storage never holds a temporary
object. A temporary sibling of a local ``NAME`` is named ``.NAME.tmp-<pid>-<random>`` (a file),
``.NAME.tmp-<anything>`` (a folder being filled) or ``.NAME.old-<anything>`` (a folder moved
aside): whoever owns ``NAME`` removes what a killed writer left with :func:`remove_temp_siblings`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from imm_ray.errors import UserError

logger = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "gs")


class StorageError(UserError):
    """A storage location cannot be used; the message says which and what to do."""


class StorageOptions(BaseModel):
    """Object storage for s3:// run directories; unset keys come from the AWS environment variables.

    The config's ``storage`` section; what it sets overrides what the environment says.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto, ...); default $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS."""
    region: str | None = None
    """S3 region; default $AWS_REGION, else $AWS_DEFAULT_REGION."""
    lease_ttl_s: float = Field(60.0, ge=3)
    """Seconds after which the run lease of a driver that died without releasing it expires."""
    node_cache_gb: float = Field(200.0, gt=0)
    """Bound of each node's cache of checkpoints (GB); the least recently used ones no process holds go first."""


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_arguments(options: StorageOptions | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`pyarrow.fs.S3FileSystem` from the AWS variables and ``options``."""
    options = options or StorageOptions()
    kwargs: dict[str, Any] = {}
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        token = _env("AWS_SESSION_TOKEN")
        if token:
            kwargs["session_token"] = token
    endpoint = options.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    region = options.region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
        region = region or "us-east-1"  # S3-compatible stores ignore it; never ask AWS which region
    if region:
        kwargs["region"] = region
    return kwargs


def gcs_arguments() -> dict[str, Any]:
    """Keyword arguments of :class:`pyarrow.fs.GcsFileSystem`: Google's default credentials, or an
    emulator without credentials where ``STORAGE_EMULATOR_HOST`` names one (as Google's clients do)."""
    emulator = _env("STORAGE_EMULATOR_HOST")
    if not emulator:
        return {}
    parsed = urlparse(emulator if "://" in emulator else f"http://{emulator}")
    return {"anonymous": True, "endpoint_override": parsed.netloc, "scheme": parsed.scheme}


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, options: StorageOptions, env_key: tuple[str | None, ...]) -> pafs.FileSystem:
    if scheme == "s3":
        return pafs.S3FileSystem(**s3_arguments(options))
    if scheme == "gs":
        return pafs.GcsFileSystem(**gcs_arguments())
    return pafs.LocalFileSystem()


_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST")
_default_options = StorageOptions()


def set_default_options(options: StorageOptions) -> None:
    """Use ``options`` wherever a location is resolved without its own (the driver calls this once)."""
    global _default_options
    _default_options = options


def default_options() -> StorageOptions:
    """What :func:`set_default_options` set (else the defaults)."""
    return _default_options


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem: ``uri`` is what users and Ray tasks pass around."""

    uri: str
    options: StorageOptions = StorageOptions()

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if self.uri.startswith(tuple(f"{s}://" for s in REMOTE_SCHEMES)) else ""

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def path(self) -> str:
        """The path inside the filesystem (``bucket/key`` for object stores)."""
        return self.uri.split("://", 1)[1] if self.scheme else self.uri

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self.options, tuple(os.environ.get(k) for k in _ENV_KEYS))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0], self.options)

    def local_path(self) -> Path:
        """The local path (only for local locations)."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is on object storage, not a local path: materialize it first")
        return Path(self.uri)

    def __truediv__(self, part: str) -> "Location":
        return Location(f"{self.uri.rstrip('/')}/{part.strip('/')}", self.options)

    def __str__(self) -> str:
        return self.uri


def resolve(target: str | Path | Location, options: StorageOptions | None = None) -> Location:
    """A location for a local path, ``file://...``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``."""
    if isinstance(target, Location):
        return target
    text = str(target)
    opts = options or _default_options
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme in REMOTE_SCHEMES:
        rest = text.split("://", 1)[1].strip("/")
        if not rest:
            raise StorageError(f"{text!r} names no bucket: use {scheme}://BUCKET/PREFIX")
        return Location(f"{scheme}://{rest}", opts)
    if scheme == "file":
        text = urlparse(text).path
    elif scheme:
        raise StorageError(f"unsupported storage scheme {scheme!r} in {text!r}: use a local path, file://, s3:// or gs://")
    return Location(str(Path(text).expanduser().resolve()), opts)


def is_remote(target: str | Path | Location) -> bool:
    """Whether ``target`` is on object storage."""
    return not resolve(target).is_local


# --- reading ----------------------------------------------------------------------------------
def exists(loc: Location) -> bool:
    """Whether a file or folder exists at ``loc``."""
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_file(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


def read_bytes(loc: Location) -> bytes:
    """The bytes of a file; FileNotFoundError when it is missing."""
    try:
        with loc.fs.open_input_stream(loc.path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not exists(loc):
            raise FileNotFoundError(loc.uri) from exc
        raise


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc: Location) -> Any:
    return json.loads(read_text(loc))


def parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    """The JSON objects of JSON-lines ``text`` (blank lines skipped).

    Raises StorageError naming ``source`` and the line when a line is not a JSON object.
    """
    rows: list[dict[str, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{source}:{line_no}: invalid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise StorageError(f"{source}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_jsonl(loc: str | Path | Location) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects (see :func:`parse_jsonl` for its errors)."""
    loc = resolve(loc)
    return parse_jsonl(read_text(loc), str(loc))


def list_files(loc: Location) -> dict[str, int]:
    """Every file under the folder ``loc`` as ``{relative/posix/path: size}`` (empty if missing)."""
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    base = loc.path.rstrip("/") + "/"
    return {info.path[len(base):] if info.path.startswith(base) else info.path: info.size
            for info in loc.fs.get_file_info(selector) if info.type == pafs.FileType.File}


def list_names(loc: Location) -> list[str]:
    """Names directly inside the folder ``loc`` (files and folders), sorted; empty if missing or a file."""
    selector = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
    try:
        return sorted(info.base_name for info in loc.fs.get_file_info(selector))
    except NotADirectoryError:
        return []


# --- writing ----------------------------------------------------------------------------------
_umask_lock = threading.Lock()


def default_mode(folder: bool = False) -> int:
    """Permissions a new file (or folder) gets from the process umask, like ``open``/``mkdir``."""
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder in ``parent`` with umask permissions (mkdtemp's are 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(default_mode(folder=True))
    return tmp


def temp_prefix(name: str) -> str:
    """How every temporary sibling of the file or folder ``name`` starts: ``.NAME.tmp-``."""
    return f".{name}.tmp-"


def _write_local(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary sibling ``.NAME.tmp-<pid>-<random>``: fill, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_prefix(path.name)}{os.getpid()}-")
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(loc: str | Path | Location, data: bytes) -> None:
    """Write a file atomically (temp sibling + fsync + rename locally; one PUT on object storage)."""
    loc = resolve(loc)
    if not loc.is_local:
        with loc.fs.open_output_stream(loc.path) as fh:
            fh.write(data)
        return
    _write_local(loc.local_path(), lambda fh: fh.write(data))


def write_text(loc: str | Path | Location, text: str) -> None:
    """Write text atomically."""
    write_bytes(loc, text.encode("utf-8"))


def write_json(loc: str | Path | Location, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(loc, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(loc: str | Path | Location, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines, atomically; return the number of rows."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    write_text(loc, "".join(line + "\n" for line in lines))
    return len(lines)


def upload_file(src: Path, loc: Location) -> None:
    """Copy a local file to ``loc``, atomically as :func:`write_bytes` does."""
    with open(src, "rb") as fin:
        if loc.is_local:
            _write_local(loc.local_path(), lambda fout: shutil.copyfileobj(fin, fout, 8 << 20))
            return
        with loc.fs.open_output_stream(loc.path) as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)


_downloaded: dict[str, int] = {}  # bytes this process copied off object storage, by file name
_downloaded_lock = threading.Lock()


def downloaded_bytes() -> dict[str, int]:
    """Bytes this process has copied from object storage with :func:`download_file`, by file name
    (what a node pays in transfer: the driver should fetch tokenizer and config files only)."""
    with _downloaded_lock:
        return dict(_downloaded)


PART_BYTES = 32 << 20  # a remote file of two parts or more downloads in ranged GETs of this size
_PARALLEL_PARTS = 8


def download_file(loc: Location, dst: Path, part_bytes: int = PART_BYTES) -> None:
    """Copy the file at ``loc`` to the local path ``dst``; FileNotFoundError when it is missing.

    A remote file of at least two ``part_bytes`` comes in parallel ranged reads (one stream per
    file is far below what a node's network and the store can carry)."""
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(loc.uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if loc.is_local or info.size < 2 * part_bytes:
        with loc.fs.open_input_stream(loc.path) as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
    else:
        _download_parts(loc, dst, info.size, part_bytes)
    size = info.size
    if not loc.is_local:
        with _downloaded_lock:
            _downloaded[loc.name] = _downloaded.get(loc.name, 0) + size


def _download_parts(loc: Location, dst: Path, size: int, part_bytes: int) -> None:
    """Ranged reads of ``part_bytes`` each, up to eight at once, written in place into ``dst``."""
    with loc.fs.open_input_file(loc.path) as fin, open(dst, "wb") as fout:
        fout.truncate(size)

        def copy_part(offset: int) -> None:
            data = fin.read_at(min(part_bytes, size - offset), offset)
            if len(data) != min(part_bytes, size - offset):
                raise OSError(f"{loc}: short read at byte {offset}")
            os.pwrite(fout.fileno(), data, offset)

        with ThreadPoolExecutor(_PARALLEL_PARTS, thread_name_prefix="download") as pool:
            list(pool.map(copy_part, range(0, size, part_bytes)))


def delete(loc: Location) -> None:
    """Remove a file or a folder (with everything under it) if present."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        if loc.is_local and Path(loc.path).is_symlink():
            Path(loc.path).unlink()
        else:
            loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)
    elif loc.is_local and Path(loc.path).is_symlink():  # a dangling link
        Path(loc.path).unlink()
    elif not loc.is_local:  # an object-store "folder" with no marker object
        for rel in list_files(loc):
            loc.fs.delete_file(f"{loc.path.rstrip('/')}/{rel}")


# What follows ``.NAME.`` in a temporary sibling: ``tmp-...`` or ``old-...``, or the ``RANDOM.tmp``
# and ``tmp`` endings that run directories written by earlier versions may hold.
_TEMP_TAIL = re.compile(r"(?:tmp-|old-).*|(?:[^.]+\.)?tmp")


def is_temp_sibling(name: str, of: str) -> bool:
    """Whether the entry ``name`` is a temporary sibling of the file or folder ``of``."""
    prefix = f".{of}."
    return name.startswith(prefix) and _TEMP_TAIL.fullmatch(name[len(prefix):]) is not None


def remove_temp_siblings(folder: Location, names: Iterable[str]) -> None:
    """Remove what killed writers of the entries ``names`` of ``folder`` left (one listing).

    Only their owner may call this (the run's lock holder for the run's files): a live writer's
    temporary sibling looks the same as a dead one's.
    """
    owned = list(names)
    for name in list_names(folder):
        if any(is_temp_sibling(name, of) for of in owned):
            logger.warning("removing %s left by an interrupted writer", folder / name)
            delete(folder / name)
