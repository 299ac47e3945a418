"""The node types an autoscaler may add, as the user declares them (no Ray).

Ray 2.60 reports an autoscaler's node types through no public API (the private
``ray._private.state.state.get_cluster_config()`` is never written, so it is always None), so the
run takes them from its config: ``ray.node_types`` (``{gpu: {resources: {CPU: 8, GPU: 1},
max_workers: 4}}``, e.g. a KubeRay cluster's worker groups) or ``ray.cluster_yaml``, the cluster
YAML the user launched with ``ray up`` (its ``available_node_types``; on the head that file is
``~/ray_bootstrap_config.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imm_ray.placement.core import NodeType, PlacementError

__all__ = ["NO_NODE_TYPES", "NodeTypes", "declared_node_types", "node_types_from_cluster_yaml"]


@dataclass(frozen=True)
class NodeTypes:
    """The declared worker node types and the config key that declared them (none: a fixed cluster)."""

    types: tuple[NodeType, ...] = ()
    declared_by: str = ""


NO_NODE_TYPES = NodeTypes()  # a fixed cluster: its alive nodes are all it will ever have


def node_types_from_cluster_yaml(tree: Mapping[str, Any], where: str) -> tuple[NodeType, ...]:
    """The worker types of a cluster YAML's ``available_node_types`` (the head's type left out: the
    head is an alive node); a type's ``max_workers`` defaults to the YAML's top-level one (Ray's: 2)."""
    types = tree.get("available_node_types") if isinstance(tree, Mapping) else None
    if not isinstance(types, Mapping) or not types:
        raise PlacementError(f"{where} has no available_node_types: point ray.cluster_yaml at the YAML the "
                             "cluster was launched with (ray up)")
    default_max = int(tree.get("max_workers", 2))
    out = []
    for name, spec in types.items():
        if name == tree.get("head_node_type"):
            continue
        resources = (spec or {}).get("resources")
        if not resources:
            raise PlacementError(f"{where}: node type {name!r} declares no resources; add `resources:` (e.g. "
                                 "{CPU: 8, GPU: 1}, what Ray finds on that machine) so the run knows what it may "
                                 "wait for")
        out.append(NodeType(str(name), {k: float(v) for k, v in resources.items()},
                            int(spec.get("max_workers", default_max))))
    return tuple(out)


def declared_node_types(node_types: Mapping[str, Any], cluster_yaml: str | None) -> NodeTypes:
    """The node types of ``ray.node_types`` (name -> {resources, max_workers}) or of the cluster YAML
    at ``ray.cluster_yaml``; none when neither is set."""
    if cluster_yaml:
        path = Path(cluster_yaml).expanduser()
        where = f"ray.cluster_yaml ({path})"
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PlacementError(f"{where} cannot be read: {exc}") from exc
        return NodeTypes(node_types_from_cluster_yaml(tree, where), where)
    if node_types:
        types = tuple(NodeType(name, dict(_field(spec, "resources")), int(_field(spec, "max_workers")))
                      for name, spec in node_types.items())
        return NodeTypes(types, "ray.node_types")
    return NodeTypes()


def _field(spec: Any, name: str) -> Any:
    """A field of a config model or of a plain mapping."""
    return spec[name] if isinstance(spec, Mapping) else getattr(spec, name)
