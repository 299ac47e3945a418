"""Files, folders and checkpoints on a local disk or object storage (no Ray, no torch, no runs).

See :mod:`imm_ray.storage.fs` (locations, atomic writes), :mod:`imm_ray.storage.checkpoints`
(publish with a manifest, materialize into a node-local cache), :mod:`imm_ray.storage.lease`
(the heartbeat lease's storage). What a run directory holds is :mod:`imm_ray.run`.
"""

from imm_ray.storage.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_checksum,
    clear_output,
    default_cache_dir,
    folder_checksum,
    is_published,
    materialize,
    materialize_verified,
    publish_dir,
    published_manifest,
    scratch_dir,
    verify_manifest,
    work_dir_for,
    write_manifest,
)
from imm_ray.storage.fs import (
    Location,
    StorageError,
    StorageOptions,
    default_mode,
    delete,
    exists,
    is_remote,
    make_temp_dir,
    parse_jsonl,
    read_json,
    read_jsonl,
    read_text,
    remove_temp_siblings,
    resolve,
    set_default_options,
    temp_prefix,
    write_json,
    write_jsonl,
    write_text,
)
from imm_ray.storage.lease import RunLockedError

__all__ = [
    "CheckpointError", "Location", "MANIFEST_NAME", "RunLockedError", "StorageError",
    "StorageOptions", "checkpoint_checksum", "clear_output", "default_cache_dir", "default_mode", "delete", "exists",
    "folder_checksum",
    "is_published", "is_remote", "make_temp_dir", "materialize", "materialize_verified", "parse_jsonl",
    "publish_dir", "published_manifest", "read_json", "read_jsonl", "read_text", "remove_temp_siblings", "resolve",
    "scratch_dir", "set_default_options", "temp_prefix", "verify_manifest", "work_dir_for",
    "write_json", "write_jsonl", "write_manifest", "write_text",
]
