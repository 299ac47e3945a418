"""How every round's model is evaluated: the config's ``evaluate`` section, which ``imm eval``'s
settings extend (pure: pydantic only)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imm_ray.errors import known_name
from imm_ray.verify.verifiers import VERIFIERS, needs_gold

__all__ = ["EvalSettings"]


class EvalSettings(BaseModel):
    """Greedy evaluation of every round's model on the eval sets."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    max_tokens: int = Field(512, ge=1)
    """Longest answer in new tokens."""
    baseline: bool = True
    """Also evaluate the original model (round 0)."""
    verifier: str = "auto"
    """auto: numeric when every gold answer of a set is a number, math-verify otherwise (MATH-500)."""
    samples: int = Field(1, ge=1)
    """Also sample this many answers per question at `temperature` for pass@k (1: greedy only)."""
    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature of those answers (greedy accuracy is unaffected); > 0 when samples > 1."""

    @model_validator(mode="after")
    def _samples_need_temperature(self) -> EvalSettings:
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError("samples > 1 needs temperature > 0: greedy samples are all the same")
        return self

    @field_validator("verifier")
    @classmethod
    def _scores_against_gold(cls, v: str) -> str:
        known = ["auto", *(n for n in VERIFIERS if needs_gold(n))]  # accuracy is measured against gold
        return known_name("evaluation verifier", v, known)
