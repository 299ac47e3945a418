"""Evaluation: scoring, pass@k / maj@k / bootstrap metrics, collapse (diversity) metrics, the
per-question ledger with paired comparisons, and the ``imm eval`` harness. Nothing here imports
Ray unless a Ray address is given to the harness."""

from imm_ray.evaluate.accuracy import DatasetScore, score_completions, score_verdicts
from imm_ray.evaluate.diversity import (
    bleu,
    distinct_n,
    diversity_metrics,
    group_by_question,
    mean_token_entropy,
    self_bleu,
)
from imm_ray.evaluate.harness import EvalRun, evaluate_model
from imm_ray.evaluate.ledger import Changes, Ledger, question_changes, read_ledger, sample_rows
from imm_ray.evaluate.metrics import (
    bootstrap_ci,
    maj_at_k,
    majority_vote,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
)
from imm_ray.evaluate.paired import PairedDifference, mcnemar_exact, paired_difference
from imm_ray.evaluate.scoring import DatasetEvaluation, evaluate_completions, pick_verifier
from imm_ray.evaluate.settings import EvalSettings
from imm_ray.evaluate.specs import parse_dataset_arg, parse_dataset_args
from imm_ray.generate.entropy import token_entropy

__all__ = [
    "Changes",
    "DatasetEvaluation",
    "DatasetScore",
    "EvalRun",
    "EvalSettings",
    "Ledger",
    "PairedDifference",
    "bleu",
    "bootstrap_ci",
    "distinct_n",
    "diversity_metrics",
    "evaluate_completions",
    "evaluate_model",
    "group_by_question",
    "maj_at_k",
    "majority_vote",
    "mcnemar_exact",
    "mean_maj_at_k",
    "mean_pass_at_k",
    "mean_token_entropy",
    "parse_dataset_arg",
    "parse_dataset_args",
    "paired_difference",
    "pass_at_k",
    "pick_verifier",
    "question_changes",
    "read_ledger",
    "sample_rows",
    "score_completions",
    "score_verdicts",
    "self_bleu",
    "token_entropy",
]
