"""Placement as data: check a resource request against what the cluster has and can ever have (no Ray).

A request is ``count`` bundles of ``resources`` (e.g. the generator actors of
``generate.resources``); a :class:`ClusterView` is the alive nodes plus the node types an
autoscaler may add (declared by the user: :mod:`imm_ray.placement.node_types`).
:func:`check_request` fails at once, naming the resource, the node types and the config key, when
no node can ever hold a request; :func:`packs` and :func:`at_once` say how many sets of bundles
(arms, analysis tasks) the cluster can hold together, node by node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

from imm_ray.errors import UserError

__all__ = ["ClusterView", "NodeType", "PlacementError", "ResourceRequest", "at_once", "check_request",
           "custom_resources", "describe", "fits", "packs", "release_pools_for_sft"]

# Config spelling of Ray's resource names, for error messages.
_KEY_FIELD = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
# Resources that differ between nodes of one type (Ray sizes them from the machine): not matched.
_MEASURED = ("memory", "object_store_memory")


class PlacementError(UserError, RuntimeError):
    """A resource request that the cluster can never satisfy, or that waited past its deadline."""


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

    def bundles(self) -> list[dict[str, float]]:
        """The ``count`` bundles (none when the request asks for nothing)."""
        bundle = self.needs()
        return [dict(bundle) for _ in range(self.count)] if bundle else []


@dataclass(frozen=True)
class NodeType:
    """An autoscaler node type: what one node offers and how many may exist (-1: unbounded)."""

    name: str
    resources: Mapping[str, float]
    max_count: int = -1

    def matches(self, node: Mapping[str, float]) -> bool:
        """Whether an alive node's resources are this type's (memory and object store aside)."""
        return all(math.isclose(node.get(k, 0.0), v) for k, v in self.resources.items() if k not in _MEASURED)


@dataclass
class ClusterView:
    """The total resources of the alive nodes and the node types an autoscaler may start."""

    nodes: list[Mapping[str, float]] = field(default_factory=list)
    node_types: list[NodeType] = field(default_factory=list)
    declared_by: str = "the autoscaler"  # the config key that declared the node types, for messages

    def capacity(self) -> tuple[list[Mapping[str, float]], list[tuple[NodeType, int]]]:
        """The alive nodes of no declared type, and each type with the most nodes it may have
        (-1: unbounded); an alive node of a type counts among that type's nodes."""
        matched = [0] * len(self.node_types)
        other = []
        for node in self.nodes:
            i = next((i for i, t in enumerate(self.node_types) if t.matches(node)), None)
            if i is None:
                other.append(node)
            else:
                matched[i] += 1
        return other, [(t, -1 if t.max_count < 0 else max(t.max_count, n)) for t, n in zip(self.node_types, matched)]


def custom_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """Validate a config's custom Ray resources (e.g. ``{"node_1": 0.01}``): names Ray's own keys refuse."""
    for name, amount in resources.items():
        if name in _KEY_FIELD:
            raise ValueError(f"{name!r} is Ray's own resource, not a custom one: set it with its own key "
                             "(num_cpus / num_gpus; in train: cpus_per_worker / use_gpu)")
        if not name or amount < 0:
            raise ValueError(f"custom resource {name!r}: {amount:g} must be a non-empty name with an amount >= 0")
    return dict(resources)


def fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many bundles one node of these resources holds."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()), default=1 << 30)


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k not in _MEASURED) or "nothing"


def describe(cluster: ClusterView) -> str:
    """The node types, for messages: ``cpu x2 (CPU: 2), gpu x1 (CPU: 1, GPU: 1) (ray.node_types)``."""
    if not cluster.node_types:
        return "no node types declared (ray.node_types / ray.cluster_yaml)"
    types = ", ".join(f"{t.name} x{'any' if t.max_count < 0 else t.max_count} ({_fmt(t.resources)})"
                      for t in cluster.node_types)
    return f"{types} ({cluster.declared_by})"


def _key_for(request: ResourceRequest, resource: str) -> str:
    return f"{request.config_key}.{request.key_fields.get(resource, 'resources')}"


def check_request(request: ResourceRequest, cluster: ClusterView) -> None:
    """Raise :class:`PlacementError` if the cluster can never hold ``request`` (pure)."""
    bundle = request.needs()
    if not bundle:
        return
    other, types = cluster.capacity()
    shapes = list(cluster.nodes) + [t.resources for t, _ in types]
    if not any(fits(bundle, n) >= 1 for n in shapes):
        # Name the first resource that no node offers enough of.
        short = next((k for k, v in bundle.items() if all(n.get(k, 0.0) < v for n in shapes)), next(iter(bundle)))
        largest = max((n.get(short, 0.0) for n in shapes), default=0.0)
        if cluster.node_types:
            where, fix = f"its alive nodes or node types: {describe(cluster)}", \
                f"declare a node type with more {short} in {cluster.declared_by}"
        else:
            where = "its alive nodes, and no autoscaler node types are declared"
            fix = (f"add a node with more {short} (on an autoscaling cluster: declare the node types it may "
                   "add in ray.node_types or ray.cluster_yaml)")
        raise PlacementError(
            f"each {request.what} asks for {short}: {bundle[short]:g} ({_key_for(request, short)}), but none of "
            f"{where} offers that much (the most is {largest:g}; one {request.what} needs {_fmt(bundle)}). "
            f"Lower {_key_for(request, short)} or {fix}.")
    if any(n < 0 and fits(bundle, t.resources) >= 1 for t, n in types):
        return
    room = sum(fits(bundle, n) for n in other) + sum(n * fits(bundle, t.resources) for t, n in types)
    if room < request.count:
        raise PlacementError(
            f"{request.count} {request.what}s of {_fmt(bundle)} each ({request.config_key}) need more than the "
            f"cluster can ever hold at once (room for {room}; node types: {describe(cluster)}). Lower the count "
            f"or {request.config_key}.")


def packs(bundles: Sequence[Mapping[str, float]], cluster: ClusterView) -> bool:
    """Whether all ``bundles`` can be held at once, node by node, on the cluster at its largest
    (first-fit decreasing: a quick, safe-side answer, not an optimal packing)."""
    other, types = cluster.capacity()
    free = [dict(n) for n in other]
    left = [n for _, n in types]
    for bundle in sorted(bundles, key=lambda b: sorted(b.values(), reverse=True), reverse=True):
        node = next((n for n in free if fits(bundle, n) >= 1), None)
        if node is None:
            i = next((i for i, (t, _) in enumerate(types) if left[i] != 0 and fits(bundle, t.resources) >= 1), None)
            if i is None:
                return False
            left[i] -= 1 if left[i] > 0 else 0
            node = dict(types[i][0].resources)
            free.append(node)
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return True


def at_once(sets: Sequence[Sequence[Mapping[str, float]]], cluster: ClusterView, most: int) -> int:
    """The largest ``n <= most`` (at least 1) such that any ``n`` of ``sets``, repeats allowed, are held
    at once: e.g. ``sets`` are an arm's stages, each a list of bundles, and any two arms may be in any
    two stages at the same time."""
    n = 1
    while n < most and all(packs([b for s in combo for b in s], cluster)
                           for combo in combinations_with_replacement(sets, n + 1)):
        n += 1
    return n


def release_pools_for_sft(mode: str, autoscales: bool) -> bool | None:
    """Whether SFT shuts the generator actors down first (``generate.release_during_sft``): True always,
    False never, None only when SFT cannot be placed beside them. ``auto`` releases always on an
    autoscaling cluster: actors kept through SFT hold their node, which then never idles and is never
    scaled down, although they start again on the next generation anyway."""
    return {"always": True, "never": False}.get(mode, True if autoscales else None)
