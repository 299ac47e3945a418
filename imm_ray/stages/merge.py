"""The merge stage: merge the round's SFT checkpoint into the anchor with the configured method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imm_ray.run.infos import MergeInfo
from imm_ray.stages.ports import Merge
from imm_ray.storage import Location


def merge(run_merge: Merge, method: str, anchor: str, sft: str, out: Location, params: Mapping[str, Any],
          seed: int) -> MergeInfo:
    """Merge ``sft`` into ``anchor`` by ``method`` with ``params`` into ``out`` (``run_merge`` does the work)."""
    checkpoint = run_merge(anchor, sft, out, params)
    return MergeInfo(method=method, params=dict(params), seed=seed, anchor=anchor, checkpoint=checkpoint)
