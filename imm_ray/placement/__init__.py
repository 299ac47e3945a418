"""Placement that cannot hang: requests checked against what the cluster has and can ever have, and
bounded, logged waits for the rest.

:mod:`~imm_ray.placement.core` holds the pure checks and packing, :mod:`~imm_ray.placement.node_types`
the node types the user declares, :mod:`~imm_ray.placement.cluster` the Ray edges.
"""

from imm_ray.placement.cluster import (
    AutoscalerRequests,
    NodeWatch,
    check_on_cluster,
    cluster_view,
    fits_now,
    reserved,
    wait_placed,
)
from imm_ray.placement.core import (
    ClusterView,
    NodeType,
    PlacementError,
    ResourceRequest,
    at_once,
    check_request,
    custom_resources,
    describe,
    fits,
    packs,
    release_pools_for_sft,
)
from imm_ray.placement.node_types import NO_NODE_TYPES, NodeTypes, declared_node_types, node_types_from_cluster_yaml

__all__ = ["NO_NODE_TYPES", "AutoscalerRequests", "ClusterView", "NodeType", "NodeTypes", "NodeWatch", "PlacementError",
           "ResourceRequest", "at_once", "check_on_cluster", "check_request", "cluster_view", "custom_resources",
           "declared_node_types", "describe", "fits", "fits_now", "node_types_from_cluster_yaml", "packs",
           "release_pools_for_sft", "reserved", "wait_placed"]
