"""The layer analysis across seeds: each run's Spearman rho between layer importance and parameter
change, and their mean with a 95% interval (pure: no Ray, no I/O).

Two intervals, for two questions:

* **across seeds** (``low``/``high``): a Student-t interval over the runs' rhos. The seeds are the
  independent replications of the whole experiment (sampling, SFT order, merge mask), so their
  spread is what a claim about the method must survive. With 2 seeds t(0.975, 1) = 12.7 makes it
  wide, honestly so; its ends are clipped to rho's range [-1, 1]. With one run there is no
  interval (None).
* **within a run** (``per_run[i].low``/``high``): a percentile bootstrap over the layers, resampled
  in pairs (importance, change). It says how much one run's rho rests on a few layers, not how it
  would vary with another seed; the layers are few (30 in SmolLM2-135M) and not independent, so
  it is a sensitivity check, reported beside the seed interval rather than instead of it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from imm_ray.analysis.stats import spearman

__all__ = ["SEED_INTERVAL", "RunRho", "SeedCorrelation", "bootstrap_rho", "combine_analyses", "layer_pairs",
           "mean_t_interval", "t_quantile_975"]

# t(0.975, df) for df = 1..30; larger df use the Cornish-Fisher expansion around 1.96 (error < 1e-3).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964
SEED_INTERVAL = ("runs: mean and 95% Student-t interval over the runs' rhos; per run: 95% percentile "
                 "bootstrap over layers")


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_t_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """The mean of ``values`` and its 95% Student-t interval (None, None for a single value)."""
    if not values:
        raise ValueError("mean_t_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_rho(x: Sequence[float | None], y: Sequence[float | None], resamples: int = 1000,
                  seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile 95% interval of Spearman's rho over layers resampled in pairs (seeded); resamples
    whose rho is undefined (a constant side) are skipped; (None, None) when fewer than 3 pairs."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None, None
    rng = random.Random(seed)
    rhos = []
    for _ in range(resamples):
        draw = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        rho = spearman([a for a, _ in draw], [b for _, b in draw])
        if rho is not None:
            rhos.append(rho)
    if not rhos:
        return None, None
    rhos.sort()
    return rhos[int(0.025 * (len(rhos) - 1))], rhos[math.ceil(0.975 * (len(rhos) - 1))]


@dataclass(frozen=True)
class RunRho:
    """One run's rho for a model and measure, with its bootstrap interval over layers."""

    run: str
    rho: float
    low: float | None
    high: float | None


@dataclass(frozen=True)
class SeedCorrelation:
    """A model (arm, round, kind) and importance measure across runs: each run's rho, their mean and
    the t interval over runs (None with one run)."""

    arm: str
    round: int
    kind: str
    measure: str  # the importance column: accuracy_drop or loss_rise
    per_run: tuple[RunRho, ...]
    mean: float
    low: float | None
    high: float | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_run": [asdict(r) for r in self.per_run]}


def layer_pairs(analysis: Mapping[str, Any], model: Mapping[str, Any], measure: str
                ) -> tuple[list[float | None], list[float | None]]:
    """Per layer: the importance ``measure`` (analysis.json's importance table) and the model's
    relative parameter change, the two series its Spearman rho was computed on."""
    layers = (analysis.get("importance") or {}).get("layers") or []
    return [row.get(measure) for row in layers], list(model["change"]["per_layer"])


def combine_analyses(analyses: Mapping[str, Mapping[str, Any]], resamples: int = 1000,
                     seed: int = 0) -> list[SeedCorrelation]:
    """Every (arm, round, kind, measure) with a rho in at least one run's analysis.json (run label ->
    its parsed JSON), in arm, round, kind, measure order; the runs without one are left out of it."""
    found: dict[tuple[str, int, str, str], list[RunRho]] = {}
    for run, analysis in analyses.items():
        for model in analysis.get("models", []):
            for measure, rho in (model.get("spearman") or {}).items():
                if rho is None:
                    continue
                low, high = bootstrap_rho(*layer_pairs(analysis, model, measure), resamples, seed)
                key = (model["arm"], int(model["round"]), model["kind"], measure)
                found.setdefault(key, []).append(RunRho(run, float(rho), low, high))
    out = []
    for (arm, round_idx, kind, measure), runs in sorted(found.items()):
        mean, low, high = mean_t_interval([r.rho for r in runs])
        low, high = (None, None) if low is None or high is None else (max(-1.0, low), min(1.0, high))
        out.append(SeedCorrelation(arm, round_idx, kind, measure, tuple(runs), mean, low, high))
    return out
