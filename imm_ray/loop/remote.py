"""Ray tasks wrapping the pure merge core and model publishing (thin edges: storage in, storage out)."""

from __future__ import annotations

import shutil
from typing import Any

import ray

from imm_ray.merge import merge_checkpoints
from imm_ray.merge.engine import output_sha256
from imm_ray.merge.options import MergeOptions
from imm_ray.models import resolve_model
from imm_ray.ray_env import actor_runtime_env
from imm_ray.storage import (
    StorageOptions,
    materialize_verified,
    publish_dir,
    resolve,
    set_default_options,
    work_dir_for,
)


@ray.remote
def merge_task(method: str, anchor: str, models: list[str], out: str, params: dict[str, Any], seed: int,
               options: StorageOptions) -> str:
    """On whichever node runs it: materialize the inputs, merge into local scratch, publish to ``out``."""
    set_default_options(options)
    work = work_dir_for(out)
    try:
        # Each file is hashed once: inputs when materialize verifies them (a local input by the merge's
        # provenance), outputs by the merge as it writes them; the manifest reuses those digests.
        (anchor_dir, known), model_dirs = materialize_verified(anchor), []
        for model in models:
            model_dir, verified = materialize_verified(model)
            model_dirs.append(str(model_dir))
            known.update(verified)
        options = MergeOptions(method=method, params=params, seed=seed, fsync=True)
        merged = merge_checkpoints(str(anchor_dir), model_dirs, str(work / "merged"), options, known_sha256=known)
        return publish_dir(merged, resolve(out), move=True, known_sha256=output_sha256(merged)).uri
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _with_env(task: Any, **options: Any) -> Any:
    """``task`` with ``options`` and the runtime environment that storage access needs."""
    runtime_env = actor_runtime_env()
    return task.options(**options, **({"runtime_env": runtime_env} if runtime_env else {}))


def merge_remote(method: str, anchor: str, models: list[str], out: str, params: dict[str, Any], seed: int,
                 options: StorageOptions, resources: dict[str, float], placement_group: Any = None) -> str:
    """Run a merge as a Ray task with its own resource request (in ``placement_group``'s first bundle
    when given: room already found); returns the published checkpoint's URI."""
    extra: dict[str, Any] = {}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        extra["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=0)
    ref = _with_env(merge_task, **resources, **extra).remote(method, anchor, models, out, params, seed, options)
    return ray.get(ref)


@ray.remote
def publish_model_task(model_ref: str, out: str, cache_dir: str | None, options: StorageOptions) -> str:
    """On whichever node runs it: resolve a model reference (hub id, embedded model, URI) into that
    node's cache and publish it to ``out``."""
    set_default_options(options)
    return publish_dir(resolve_model(model_ref, cache_dir), resolve(out)).uri


def publish_model_remote(model_ref: str, out: str, cache_dir: str | None, options: StorageOptions) -> str:
    """Copy a model into the run directory once, in a Ray task (one CPU), so that the driver's node
    never downloads its weights; returns the published checkpoint's URI."""
    return ray.get(_with_env(publish_model_task, num_cpus=1).remote(model_ref, out, cache_dir, options))
