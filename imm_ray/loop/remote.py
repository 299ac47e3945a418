"""Ray tasks wrapping the pure verify and merge cores (thin edges, no logic of their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from imm_ray.merge import merge_checkpoints
from imm_ray.verify import Verdict, verify_batch


@ray.remote
def verify_chunk(pairs: list[tuple[str, str]], verifier: str) -> list[Verdict]:
    """Verify (completion, gold) pairs with the named verifier."""
    return verify_batch(pairs, verifier=verifier)


def verify_remote(pairs: list[tuple[str, str]], verifier: str, batch_size: int, num_cpus: float) -> list[Verdict]:
    """Verify all pairs as parallel Ray tasks of ``batch_size`` pairs; order is preserved."""
    task = verify_chunk.options(num_cpus=num_cpus)
    refs = [task.remote(pairs[i : i + batch_size], verifier) for i in range(0, len(pairs), batch_size)]
    return [v for chunk in ray.get(refs) for v in chunk]


@ray.remote
def merge_task(method: str, anchor: str, models: list[str], out_dir: str, params: dict[str, Any], seed: int) -> str:
    """Run one merge on a worker; returns the output folder (fsynced: the stage is then marked done)."""
    return str(merge_checkpoints(method, anchor, models, out_dir, params=params, seed=seed, fsync=True))


def merge_remote(
    method: str, anchor: Path, models: list[Path], out_dir: Path, params: dict[str, Any], seed: int,
    num_cpus: float, num_gpus: float,
) -> Path:
    """Run a merge as a Ray task with its own resource request."""
    ref = merge_task.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
        method, str(anchor), [str(m) for m in models], str(out_dir), params, seed
    )
    return Path(ray.get(ref))
