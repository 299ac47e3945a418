"""Placement that cannot hang: check a resource request against what the cluster has and can ever have.

The pure part (:func:`check_request`) compares one request (``count`` bundles of ``resources``,
e.g. the generator actors of ``generate.resources``) with the nodes the cluster has now and the
node types its autoscaler may add. A request no node can ever hold fails at once with a
:class:`PlacementError` that names the resource and the config key. The Ray edges
(:func:`cluster_view`, :func:`check_on_cluster`, :func:`wait_placed`) import Ray lazily.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClusterView", "NodeType", "PlacementError", "ResourceRequest", "check_on_cluster", "check_request",
           "cluster_view", "custom_resources", "fits_now", "wait_placed"]

logger = logging.getLogger(__name__)

# Config spelling of Ray's resource names, for error messages.
_KEY_FIELD = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


class PlacementError(RuntimeError):
    """A resource request that the cluster can never satisfy."""


@dataclass(frozen=True)
class ResourceRequest:
    """``count`` bundles of ``resources`` held at once, asked for by config key ``config_key``."""

    what: str  # e.g. "generator actor"
    config_key: str  # e.g. "generate.resources"
    resources: Mapping[str, float]
    count: int = 1
    # The config field of each of Ray's resource names where it differs from the default spelling
    # (``train`` says ``cpus_per_worker`` / ``use_gpu``); other resources are ``<config_key>.resources``.
    key_fields: Mapping[str, str] = field(default_factory=lambda: dict(_KEY_FIELD))

    def needs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.resources.items() if v and v > 0}


@dataclass(frozen=True)
class NodeType:
    """An autoscaler node type: what one node offers and how many may exist (-1: unbounded)."""

    name: str
    resources: Mapping[str, float]
    max_count: int = -1


@dataclass
class ClusterView:
    """The resources of the alive nodes and of the node types the autoscaler may start."""

    nodes: list[Mapping[str, float]] = field(default_factory=list)
    node_types: list[NodeType] = field(default_factory=list)


def custom_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """Validate a config's custom Ray resources (e.g. ``{"node_1": 0.01}``): names Ray's own keys refuse."""
    for name, amount in resources.items():
        if name in _KEY_FIELD:
            raise ValueError(f"{name!r} is Ray's own resource, not a custom one: set it with its own key "
                             "(num_cpus / num_gpus; in train: cpus_per_worker / use_gpu)")
        if not name or amount < 0:
            raise ValueError(f"custom resource {name!r}: {amount:g} must be a non-empty name with an amount >= 0")
    return dict(resources)


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many bundles one node of these resources holds."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()), default=1 << 30)


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) or "nothing"


def _key_for(request: ResourceRequest, resource: str) -> str:
    return f"{request.config_key}.{request.key_fields.get(resource, 'resources')}"


def check_request(request: ResourceRequest, cluster: ClusterView) -> None:
    """Raise :class:`PlacementError` if the cluster can never hold ``request`` (pure)."""
    bundle = request.needs()
    if not bundle:
        return
    shapes = list(cluster.nodes) + [t.resources for t in cluster.node_types]
    if not any(_fits(bundle, n) >= 1 for n in shapes):
        # Name the first resource that no node offers enough of.
        short = next((k for k, v in bundle.items() if all(n.get(k, 0.0) < v for n in shapes)), next(iter(bundle)))
        largest = max((n.get(short, 0.0) for n in shapes), default=0.0)
        where = "its nodes" + (" or autoscaler node types" if cluster.node_types else "")
        raise PlacementError(
            f"each {request.what} asks for {short}: {bundle[short]:g} ({_key_for(request, short)}), but none of "
            f"{where} offers that much (the most is {largest:g}; one {request.what} needs {_fmt(bundle)}). "
            f"Lower {_key_for(request, short)} or add a node with more {short}.")
    unbounded = any(t.max_count < 0 and _fits(bundle, t.resources) >= 1 for t in cluster.node_types)
    if unbounded:
        return
    room = sum(_fits(bundle, n) for n in cluster.nodes)
    room += sum(t.max_count * _fits(bundle, t.resources) for t in cluster.node_types)
    if room < request.count:
        raise PlacementError(
            f"{request.count} {request.what}s of {_fmt(bundle)} each ({request.config_key}) need more than the "
            f"cluster can ever hold at once (room for {room}). Lower the count or {request.config_key}.")


def cluster_view() -> ClusterView:
    """The alive nodes' total resources and, when Ray reports them, the autoscaler's node types."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    types: list[NodeType] = []
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        for group in getattr(config, "node_group_configs", None) or []:
            types.append(NodeType(group.name, dict(group.resources), int(group.max_count)))
    except Exception:  # noqa: BLE001 - not every cluster has an autoscaler config to report
        logger.debug("no autoscaler node types reported", exc_info=True)
    return ClusterView(nodes=nodes, node_types=types)


def fits_now(request: ResourceRequest) -> bool:
    """Whether the connected cluster's free resources, node by node, hold ``request`` right now."""
    import ray

    free = [dict(n) for n in ray._private.state.available_resources_per_node().values()]
    try:
        check_request(request, ClusterView(nodes=free))
    except PlacementError:
        return False
    return True


def check_on_cluster(request: ResourceRequest) -> None:
    """:func:`check_request` against the connected Ray cluster."""
    check_request(request, cluster_view())


def wait_placed(refs: Sequence[Any], request: ResourceRequest, log_after_s: float = 60.0,
                timeout_s: float | None = None) -> None:
    """Wait for ``refs`` (e.g. actors' ``__ray_ready__``); every ``log_after_s`` say what is pending.

    Raises :class:`PlacementError` after ``timeout_s`` (None: wait for ever, logging).
    """
    import ray

    pending, start = list(refs), time.monotonic()
    while pending:
        step = log_after_s if timeout_s is None else min(log_after_s, max(0.1, timeout_s - (time.monotonic() - start)))
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
        if not pending:
            break
        waited = time.monotonic() - start
        available = ray.available_resources()
        msg = (f"{len(pending)} of {len(refs)} {request.what}s ({_fmt(request.needs())} each, "
               f"{request.config_key}) still wait for resources after {waited:.0f} s; the cluster has "
               f"{_fmt(available)} free of {_fmt(ray.cluster_resources())}")
        if timeout_s is not None and waited >= timeout_s:
            raise PlacementError(msg)
        logger.warning(msg)
