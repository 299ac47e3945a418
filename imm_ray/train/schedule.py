"""Learning-rate schedule: linear warmup, then cosine / linear decay or constant."""

from __future__ import annotations

import math
from typing import Literal

SchedulerName = Literal["cosine", "linear", "constant"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps (rounded up, as the HF Trainer does)."""
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: SchedulerName) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index `step`.

    Unlike transformers' schedulers (whose first step has lr 0), warmup ramps as
    (step + 1) / warmup, so every step trains, even in a one-step run. Decay runs from the
    peak at the first step after warmup towards 0, which the last step does not reach.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
