"""Conditional object writes on S3 through boto3: create only if absent, replace only if unchanged.

pyarrow's filesystems expose no preconditions, yet the run lease and ``state.json`` need them so
that two drivers cannot both win: S3 honours ``If-None-Match: *`` (create) and ``If-Match: <etag>``
(replace) on PutObject, and answers 412 to the loser. Reads return the object's ETag and its age by
the store's own clock (its ``Date`` header minus ``Last-Modified``), so expiry never depends on
the clocks of the drivers' machines. Other stores (``gs://`` through pyarrow) have none of this
here: :func:`supports` says which locations do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from imm_ray.storage.fs import _ENV_KEYS, Location, StorageOptions, s3_arguments

# The store's timestamps have whole seconds: an age may be off by this much either way.
CLOCK_RESOLUTION_S = 1.0


class PreconditionFailed(Exception):
    """The object appeared, changed or vanished since it was read: another writer got there first."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes, its ETag and its age in seconds by the store's clock."""

    data: bytes
    etag: str
    age_s: float


def supports(loc: Location) -> bool:
    """Whether conditional writes are available for ``loc`` (S3 and S3-compatible stores)."""
    return loc.scheme == "s3"


@functools.lru_cache(maxsize=8)
def _client(options: StorageOptions, env_key: tuple[str | None, ...]) -> Any:
    import boto3

    args = s3_arguments(options)
    kwargs: dict[str, Any] = {"region_name": args.get("region")}
    if "endpoint_override" in args:
        kwargs["endpoint_url"] = f"{args['scheme']}://{args['endpoint_override']}"
    if "access_key" in args:  # else boto3's own chain: instance role, IRSA, profile, ...
        kwargs.update(aws_access_key_id=args["access_key"], aws_secret_access_key=args["secret_key"],
                      aws_session_token=args.get("session_token"))
    return boto3.client("s3", **kwargs)


def _bucket_key(loc: Location) -> tuple[Any, str, str]:
    if not supports(loc):
        raise ValueError(f"{loc} has no conditional writes here (only s3:// has)")
    bucket, _, key = loc.path.partition("/")
    return _client(loc.options, tuple(os.environ.get(k) for k in _ENV_KEYS)), bucket, key


def _code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code", ""), response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def get(loc: Location) -> Versioned | None:
    """The object at ``loc`` with its ETag and age, or None when there is none (OSError when the
    store cannot be reached or refuses)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = _bucket_key(loc)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc)[0] in ("NoSuchKey", "404"):
            return None
        raise OSError(f"cannot read {loc}: {exc}") from exc
    except BotoCoreError as exc:
        raise OSError(f"cannot read {loc}: {exc}") from exc
    data = response["Body"].read()
    now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    return Versioned(data, response["ETag"], (now - response["LastModified"]).total_seconds())


def put(loc: Location, data: bytes, etag: str | None) -> str:
    """Write ``data`` at ``loc`` only if the object is still the version ``etag`` (None: only if there
    is no object yet); return the new ETag. PreconditionFailed when another writer got there first,
    OSError for any other failure."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = _bucket_key(loc)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except ClientError as exc:
        code, status = _code(exc)
        # 412: the precondition failed; 409: a concurrent conditional write; 404: If-Match on a gone object
        if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
            raise PreconditionFailed(f"{loc} was written by another writer") from None
        raise OSError(f"cannot write {loc}: {exc}") from exc
    except BotoCoreError as exc:
        raise OSError(f"cannot write {loc}: {exc}") from exc
