"""The SFT stage: fine-tune the round's model on its accepted samples, or skip when none was accepted."""

from __future__ import annotations

import logging
from collections.abc import Callable

from imm_ray.run.infos import SFTInfo
from imm_ray.stages.ports import Train
from imm_ray.storage import Location, read_jsonl

logger = logging.getLogger(__name__)


def sft(train: Train, model: str, accepted: Location, out: Location,
        make_room: Callable[[], None] = lambda: None) -> SFTInfo:
    """Fine-tune ``model`` on ``accepted`` into ``out`` with ``train`` (``make_room`` first: the workers'
    resources). Nothing accepted: the stage is skipped and the round's model stays ``model``."""
    if not read_jsonl(accepted):
        logger.warning("no sample was accepted this round: SFT skipped, the model stays %s", model)
        return SFTInfo(skipped=True, reason="no accepted samples", examples=0)
    make_room()
    res = train(model, accepted, out)  # the workers (on any node) materialize the model and publish `out`
    return SFTInfo(
        skipped=False, init_model=model, examples=res.examples, dropped=res.dropped, steps=res.steps,
        final_loss=res.final_loss, checkpoint=out.uri, tokens=res.tokens,
        tokens_per_s=round(res.tokens_per_second, 1), restarts=res.restarts,
        timings={k: round(v, 2) for k, v in res.timings.items()},
    )
