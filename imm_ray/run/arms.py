"""The arms of the comparison as data, and the pure resume logic over a round's stages (no Ray).

An arm says which model a round's SFT starts from and whether the fine-tuned model is merged into
the original. A round runs the stages of :data:`imm_ray.run.layout.ROUND_STAGES` in order; a stage
whose key (:func:`imm_ray.run.layout.stage_key`) is done in ``state.json`` is never redone.
:func:`plan_round` says, from the done stages alone, which stages of a round remain and what the
round's model is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from imm_ray.registry import Registry
from imm_ray.run import layout
from imm_ray.run.layout import ROUND_STAGES, Stage

__all__ = ["ARMS", "Arm", "RoundPlan", "get_arm", "plan_round", "round_stages"]

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


def round_stages(arm: Arm, sft_skipped: bool = False, sweep: bool = False) -> tuple[Stage, ...]:
    """The stages a round of ``arm`` runs: merge only when the arm merges and SFT trained, the merge
    sweep only then and with ``sweep`` (merge.sweep set)."""
    return tuple(s for s in ROUND_STAGES if (not s.merge_only or (arm.merges and not sft_skipped))
                 and (not s.sweep_only or sweep))


@dataclass(frozen=True)
class RoundPlan(Generic[M]):
    """What is left of a round, and the models it starts SFT from and ends with."""

    remaining: tuple[Stage, ...]  # in order; empty when the round is finished
    sft_init: M  # the model SFT fine-tunes
    sft_skipped: bool | None  # None until the SFT stage is done
    model: M | None  # the round's model (merged, sft or unchanged); None until SFT is done
    merge_params: dict[str, Any] | None = None  # the merge the round's sweep chose; None: merge.params

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
    sweep: bool = False,
) -> RoundPlan[M]:
    """Plan round ``t`` of ``arm`` from the done stages (stage key -> the info it recorded).

    ``current`` is the model the round starts from (the previous round's model, the original in
    round 1); ``round_output(name)`` is the location of the output ``name`` in the round's folder.
    A skipped SFT (its info has ``skipped: true``: nothing was accepted) leaves the model unchanged
    and drops the merge; otherwise the round's model is the ``merged`` output for an arm that
    merges, the ``sft`` output for one that does not. With ``sweep`` (merge.sweep set) an arm that
    merges sweeps before it merges, and merges with the parameters its finished sweep chose.
    """
    arm = get_arm(arm) if isinstance(arm, str) else arm
    sft_info = done.get(layout.stage_key(arm.name, t, "sft"))
    sft_skipped = None if sft_info is None else bool(sft_info.get("skipped"))
    stages = round_stages(arm, sft_skipped=bool(sft_skipped), sweep=sweep)
    remaining = tuple(s for s in stages if layout.stage_key(arm.name, t, s.name) not in done)
    if sft_skipped is None:
        model = None
    else:
        model = current if sft_skipped else round_output(arm.output)
    sft_init = original if arm.sft_from == "original" else current
    swept = done.get(layout.stage_key(arm.name, t, "sweep")) if sweep else None
    return RoundPlan(remaining, sft_init, sft_skipped, model, swept["chosen"]["params"] if swept else None)
