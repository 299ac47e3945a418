"""Ray edge of the layer analysis: run the pipeline's calls as parallel Ray tasks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from imm_ray.analysis.pipeline import Call, Runner
from imm_ray.placement import NO_NODE_TYPES, NodeTypes, at_once, cluster_view, describe
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


# More tasks than a model has layers gain nothing; the largest models here have fewer.
_MOST_TASKS = 64


def default_num_tasks(num_cpus: float = 1.0, num_gpus: float = 0.0, node_types: NodeTypes = NO_NODE_TYPES) -> int:
    """How many tasks of ``num_cpus`` / ``num_gpus`` each the cluster holds at once, node by node, with
    the node types an autoscaler may add (the run's ``ray.node_types`` / ``ray.cluster_yaml``); at
    least 1, logged with why."""
    bundle = {k: v for k, v in {"CPU": num_cpus, "GPU": num_gpus}.items() if v > 0}
    cluster = cluster_view(node_types)
    n = at_once([[bundle]], cluster, _MOST_TASKS)
    logger.info("layer analysis: %d task(s) at once of %s each: what the cluster (%d alive node(s); node types: %s) "
                "holds", n, bundle or "nothing", len(cluster.nodes), describe(cluster))
    return n
