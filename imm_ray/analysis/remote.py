"""Ray edge of the layer analysis: run the pipeline's calls as parallel Ray tasks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from imm_ray.analysis.pipeline import Call, Runner
from imm_ray.ray_env import actor_runtime_env

__all__ = ["default_num_tasks", "ray_runner"]

logger = logging.getLogger(__name__)


@ray.remote
def _call(fn: Any, args: tuple[Any, ...]) -> Any:
    return fn(*args)


def ray_runner(num_cpus: float = 1.0, num_gpus: float = 0.0) -> Runner:
    """A Runner that submits every call as one Ray task and waits for all of them, in order."""

    runtime_env = actor_runtime_env()  # the AWS variables among them: tasks read checkpoints from URIs

    def run(calls: Sequence[Call]) -> list[Any]:
        task = _call.options(num_cpus=num_cpus, num_gpus=num_gpus,
                             **({"runtime_env": runtime_env} if runtime_env else {}))
        refs = [task.remote(fn, args) for fn, args in calls]
        logger.info("layer analysis: %d Ray task(s) submitted", len(refs))
        return ray.get(refs)

    return run


def default_num_tasks(num_cpus: float = 1.0) -> int:
    """How many tasks the cluster runs at once with num_cpus each (at least 1)."""
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(cpus // max(num_cpus, 1e-9)))
