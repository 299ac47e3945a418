"""Scoring of model completions on benchmark problems (no Ray dependency)."""

from imm_ray.evaluate.accuracy import DatasetScore, score_completions, score_verdicts

__all__ = ["DatasetScore", "score_completions", "score_verdicts"]
