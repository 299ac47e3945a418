"""Final-answer extraction and verifiers for math completions (no Ray): `numeric` and `math` (math-verify)
against gold answers, `majority` (self-consistency) and `judge`
(an LLM on the generators' engine layer) without them."""

from imm_ray.verify.answers import (
    answers_match,
    extract_answer,
    normalize_answer,
    normalize_number,
    parse_number,
)
from imm_ray.verify.judge import DEFAULT_JUDGE_PROMPT, JudgeVerifier, parse_verdict
from imm_ray.verify.majority import MajorityVerifier, MajorityVote, label_precision, majority_vote
from imm_ray.verify.math_verifier import MathVerifier, math_verify_pair
from imm_ray.verify.timeout_pool import TaskOutcome, TimeoutPool
from imm_ray.verify.verifiers import (
    VERIFIERS,
    NumericVerifier,
    Verdict,
    Verifier,
    get_verifier,
    needs_gold,
    question_chunks,
    register_verifier,
    select_accepted,
    verify_batch,
    verify_rows,
)

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "JudgeVerifier",
    "VERIFIERS",
    "MajorityVerifier",
    "MajorityVote",
    "MathVerifier",
    "NumericVerifier",
    "TaskOutcome",
    "TimeoutPool",
    "Verdict",
    "Verifier",
    "answers_match",
    "extract_answer",
    "get_verifier",
    "label_precision",
    "majority_vote",
    "math_verify_pair",
    "normalize_answer",
    "needs_gold",
    "normalize_number",
    "parse_number",
    "parse_verdict",
    "question_chunks",
    "register_verifier",
    "select_accepted",
    "verify_batch",
    "verify_rows",
]
