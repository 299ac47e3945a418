"""Ray edges of placement: the cluster as Ray reports it, bounded and logged waits for room, and the
resources the run asks the autoscaler to have ready.

Every wait for resources says every ``log_s`` what is pending and why, and gives up after
``timeout_s`` (``ray.placement_log_s`` / ``ray.placement_timeout_s``). Ray is imported lazily.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from imm_ray.placement.core import ClusterView, PlacementError, ResourceRequest, check_request, describe, fits, packs
from imm_ray.placement.node_types import NO_NODE_TYPES, NodeTypes

__all__ = ["AutoscalerRequests", "NodeWatch", "check_on_cluster", "cluster_view", "fits_now", "reserved",
           "wait_placed"]

logger = logging.getLogger(__name__)


def cluster_view(declared: NodeTypes = NO_NODE_TYPES) -> ClusterView:
    """The alive nodes' total resources and the declared node types."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return ClusterView(nodes=nodes, node_types=list(declared.types), declared_by=declared.declared_by)


def fits_now(request: ResourceRequest, declared: NodeTypes = NO_NODE_TYPES) -> bool:
    """Whether ``request`` fits, node by node, in the connected cluster's free resources plus the nodes
    the autoscaler may still add (each declared type up to its max_workers, less its alive nodes)."""
    import ray

    # Private: no public Ray API gives the free resources of each node (ray.available_resources()
    # sums them over the cluster, which would say a 2-CPU bundle fits on two 1-CPU nodes).
    from ray._private.state import available_resources_per_node

    free = [dict(n) for n in available_resources_per_node().values()]
    _, types = cluster_view(declared).capacity()
    totals = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    left = []  # what each type may still add
    for t, n in types:
        more = -1 if n < 0 else n - sum(t.matches(node) for node in totals)
        left += [replace(t, max_count=more)] if more != 0 else []
    return packs(request.bundles(), ClusterView(nodes=free, node_types=left))


def check_on_cluster(request: ResourceRequest, declared: NodeTypes = NO_NODE_TYPES) -> None:
    """:func:`check_request` against the connected Ray cluster and the declared node types."""
    check_request(request, cluster_view(declared))


def _why_pending(request: ResourceRequest, cluster: ClusterView) -> str:
    """Why a request still waits: which node types could hold it, or that only freed room can."""
    bundle = request.needs()
    holders = [t.name for t in cluster.node_types if fits(bundle, t.resources) >= 1]
    if holders:
        return (f"waiting for the autoscaler to start a node of type {' or '.join(holders)} "
                f"({cluster.declared_by}), or for room on an alive node")
    return "waiting for room on an alive node (another stage or arm holds it)"


def wait_placed(refs: Sequence[Any], request: ResourceRequest, log_s: float = 60.0, timeout_s: float = 900.0,
                declared: NodeTypes = NO_NODE_TYPES) -> None:
    """Wait for ``refs`` (e.g. a placement group's ``ready()``); every ``log_s`` say what is pending and
    why; raise :class:`PlacementError` after ``timeout_s``."""
    import ray

    pending, start = list(refs), time.monotonic()
    while pending:
        step = min(log_s, max(0.1, timeout_s - (time.monotonic() - start)))
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
        if not pending:
            break
        waited = time.monotonic() - start
        cluster = cluster_view(declared)
        msg = (f"{len(pending)} of {len(refs)} placement(s) of {request.count} {request.what}(s) "
               f"({', '.join(f'{k}: {v:g}' for k, v in request.needs().items())} each, {request.config_key}) "
               f"still wait for resources after {waited:.0f} s: the cluster has {len(cluster.nodes)} alive node(s) "
               f"with {_brief(ray.available_resources())} free of {_brief(ray.cluster_resources())}; "
               f"{_why_pending(request, cluster)}")
        if waited >= timeout_s:
            raise PlacementError(f"{msg}. Gave up after {timeout_s:g} s (ray.placement_timeout_s): raise it, or "
                                 f"check that the autoscaler can start such a node (node types: {describe(cluster)})")
        logger.warning("%s; giving up after %g s (ray.placement_timeout_s)", msg, timeout_s)
    if time.monotonic() - start >= log_s:
        logger.info("%s(s) (%s) placed after %.0f s", request.what, request.config_key, time.monotonic() - start)


@contextmanager
def reserved(request: ResourceRequest, log_s: float, timeout_s: float, declared: NodeTypes = NO_NODE_TYPES,
             strategy: str = "PACK") -> Iterator[Any]:
    """A placement group holding ``request``'s bundles (None when it asks for nothing), reached with a
    bounded, logged wait (:func:`wait_placed`) and removed on exit."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = request.bundles()
    if not bundles:
        yield None
        return
    group = placement_group(bundles, strategy=strategy)
    try:
        wait_placed([group.ready()], request, log_s, timeout_s, declared)
        yield group
    finally:
        remove_placement_group(group)


class AutoscalerRequests:
    """The resources the run asks the autoscaler to have room for, one entry per owner (an arm),
    sent as one ``ray.autoscaler.sdk.request_resources`` call: the request is cluster-wide and each
    call replaces the last, so concurrent arms' wishes are merged here. ``release`` clears it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._wanted: dict[str, list[dict[str, float]]] = {}
        self._lock = threading.Lock()

    def want(self, owner: str, bundles: Sequence[Mapping[str, float]]) -> None:
        """Ask for room for ``bundles`` on behalf of ``owner`` (replacing its earlier wish)."""
        if not self.enabled:
            return
        from ray.autoscaler.sdk import request_resources

        with self._lock:
            self._wanted[owner] = [dict(b) for b in bundles]
            merged = [b for wish in self._wanted.values() for b in wish]
            request_resources(bundles=merged)
        logger.debug("asked the autoscaler for room for %d bundle(s)", len(merged))

    def release(self) -> None:
        """Withdraw every wish (``request_resources(bundles=[])``): idle nodes may go again."""
        if not self.enabled:
            return
        from ray.autoscaler.sdk import request_resources

        with self._lock:
            if self._wanted:
                self._wanted.clear()
                request_resources(bundles=[])
                logger.info("withdrew the resource requests to the autoscaler")


class NodeWatch:
    """Says which nodes joined or left the cluster since it last looked (``ray.nodes()``)."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, float]] | None = None

    def changes(self) -> str | None:
        """``"+1 node (CPU: 1, GPU: 1); -1 node (CPU: 2); 3 alive"``, or None when nothing changed."""
        import ray

        alive = {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")}
        known, self._known = self._known, alive
        if known is None:
            return None
        added = [alive[k] for k in alive.keys() - known.keys()]
        removed = [known[k] for k in known.keys() - alive.keys()]
        if not added and not removed:
            return None
        parts = [f"+1 node ({_brief(n)})" for n in added] + [f"-1 node ({_brief(n)})" for n in removed]
        return f"{'; '.join(parts)}; {len(alive)} alive"


def _brief(resources: Mapping[str, float]) -> str:
    """Ray's own and custom resources, without the per-node markers and byte counts."""
    keep = {k: v for k, v in resources.items()
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) or "nothing"
