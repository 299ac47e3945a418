"""Arms and the stages of a round, as data, with the pure resume logic over them (no Ray).

An arm says which model a round's SFT starts from and whether the fine-tuned model is merged into
the original. A round runs the stages of :data:`ROUND_STAGES` in order; a stage whose key
(:func:`imm_ray.storage.layout.stage_key`) is done in ``state.json`` is never redone.
:func:`plan_round` says, from the done stages alone, which stages of a round remain and what the
round's model is. File names and stage keys come from :mod:`imm_ray.storage.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from imm_ray.placement.core import ClusterView, at_once, describe
from imm_ray.registry import Registry
from imm_ray.storage import layout

__all__ = ["ARMS", "ROUND_STAGES", "Arm", "RoundPlan", "Stage", "arms_at_once", "get_arm", "plan_round",
           "round_stages"]

M = TypeVar("M")  # a model location: a path, a URI, ...


@dataclass(frozen=True)
class Arm:
    """What one arm of the comparison does each round."""

    name: str
    sft_from: Literal["current", "original"]  # the model SFT fine-tunes: this round's input, or θ₀
    merges: bool  # whether the fine-tuned model is merged into merge.anchor (the original)
    description: str = ""

    @property
    def output(self) -> str:
        """The folder (in the round directory) that holds the round's model when SFT trained."""
        return layout.MERGED if self.merges else layout.SFT


ARMS: Registry[Arm] = Registry("arm")
for _arm in (
    Arm("imm", "current", True, "SFT the current model, merge it with the original (IMM)"),
    Arm("si", "current", False, "SFT the current model, no merge (plain self-improvement)"),
    Arm("rest", "original", False, "SFT the original model on data the current model wrote (ReST-EM/STaR)"),
):
    ARMS.add(_arm.name, _arm)


def get_arm(name: str) -> Arm:
    """The arm called ``name``; KeyError listing the known arms otherwise."""
    return ARMS.lookup(name)


@dataclass(frozen=True)
class Stage:
    """One stage of a round and the names (in the round directory) it writes."""

    name: str
    outputs: tuple[str, ...]  # cleared before the stage runs (a half-finished stage is redone)
    merge_only: bool = False  # runs only for arms that merge, and only when SFT trained


ROUND_STAGES: tuple[Stage, ...] = (
    Stage("generate", (layout.SAMPLES,)),
    Stage("verify", (layout.ACCEPTED, layout.VERDICTS)),
    Stage("sft", (layout.SFT,)),  # clearing it clears its temp siblings (Ray Train's run folder too)
    Stage("merge", (layout.MERGED,), merge_only=True),
    Stage("evaluate", (layout.EVAL, layout.EVAL_SAMPLES)),
)


def round_stages(arm: Arm, sft_skipped: bool = False) -> tuple[Stage, ...]:
    """The stages a round of ``arm`` runs: merge only when the arm merges and SFT trained."""
    return tuple(s for s in ROUND_STAGES if not s.merge_only or (arm.merges and not sft_skipped))


@dataclass(frozen=True)
class RoundPlan(Generic[M]):
    """What is left of a round, and the models it starts SFT from and ends with."""

    remaining: tuple[Stage, ...]  # in order; empty when the round is finished
    sft_init: M  # the model SFT fine-tunes
    sft_skipped: bool | None  # None until the SFT stage is done
    model: M | None  # the round's model (merged, sft or unchanged); None until SFT is done

    @property
    def next(self) -> Stage | None:
        """The stage to run now, or None when the round is finished."""
        return self.remaining[0] if self.remaining else None


def plan_round(
    arm: Arm | str,
    t: int,
    done: Mapping[str, Mapping[str, Any]],
    *,
    current: M,
    original: M,
    round_output: Callable[[str], M],
) -> RoundPlan[M]:
    """Plan round ``t`` of ``arm`` from the done stages (stage key -> the info it recorded).

    ``current`` is the model the round starts from (the previous round's model, the original in
    round 1); ``round_output(name)`` is the location of the output ``name`` in the round's folder.
    A skipped SFT (its info has ``skipped: true``: nothing was accepted) leaves the model unchanged
    and drops the merge; otherwise the round's model is the ``merged`` output for an arm that
    merges, the ``sft`` output for one that does not.
    """
    arm = get_arm(arm) if isinstance(arm, str) else arm
    sft_info = done.get(layout.stage_key(arm.name, t, "sft"))
    sft_skipped = None if sft_info is None else bool(sft_info.get("skipped"))
    stages = round_stages(arm, sft_skipped=bool(sft_skipped))
    remaining = tuple(s for s in stages if layout.stage_key(arm.name, t, s.name) not in done)
    if sft_skipped is None:
        model = None
    else:
        model = current if sft_skipped else round_output(arm.output)
    sft_init = original if arm.sft_from == "original" else current
    return RoundPlan(remaining, sft_init, sft_skipped, model)


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
