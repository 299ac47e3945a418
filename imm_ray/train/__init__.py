"""The SFT stage: full fine-tune on accepted samples with Ray Train.

`SFTSettings` and `SFTError` import lightly (the config tree uses them); `run_sft` and
`SFTResult` load Ray, torch and transformers on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imm_ray.train.settings import SFTError, SFTSettings

if TYPE_CHECKING:
    from imm_ray.train.trainer import SFTResult, run_sft

__all__ = ["SFTError", "SFTResult", "SFTSettings", "run_sft"]


def __getattr__(name: str) -> Any:
    if name in ("run_sft", "SFTResult"):
        from imm_ray.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
