"""How many arms of the comparison run at once on the cluster (no Ray: the cluster is a view)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imm_ray.placement.core import ClusterView, at_once, describe

__all__ = ["arms_at_once"]


def arms_at_once(arms: int, limit: int, stages: Mapping[str, Sequence[Mapping[str, float]]],
                 cluster: ClusterView) -> tuple[int, str]:
    """How many arms may run concurrently, and why. ``stages`` are the bundles each stage of an arm holds
    (generator pool, SFT workers, merge task: the pool is released before a stage that does not fit
    beside it), ``cluster`` the alive nodes and the node types an autoscaler may add; any arms may be
    in any stages at once. ``limit`` caps it (``run.concurrent_arms``; 0: as many as fit)."""
    want = arms if limit == 0 else min(arms, limit)
    if want <= 1:
        return 1, "one arm at a time (run.concurrent_arms: 1)" if arms > 1 else "one arm"
    width = at_once(list(stages.values()), cluster, want)
    each = "; ".join(f"{name}: {_brief(bs)}" for name, bs in stages.items() if bs)
    holds = (f"the cluster ({len(cluster.nodes)} alive node(s); node types: {describe(cluster)}) holds any "
             f"{width} arm(s) in any of their stages ({each})")
    if width >= want:
        return want, f"{want} arms at once: {holds}"
    return width, f"{width} arm(s) at once of {want}: only {holds}"


def _brief(bundles: Sequence[Mapping[str, float]]) -> str:
    """``2 x CPU 1, GPU 1`` for two equal bundles."""
    if not bundles:
        return "nothing"
    shapes = {tuple(sorted((k, v) for k, v in b.items() if v > 0)) for b in bundles}
    text = " + ".join(", ".join(f"{k} {v:g}" for k, v in shape) for shape in sorted(shapes))
    return f"{len(bundles)} x {text}" if len(shapes) == 1 and len(bundles) > 1 else text
