"""Final-answer extraction and verifiers (`numeric`, `math` via math-verify) for math completions (no Ray)."""

from imm_ray.verify.answers import (
    answers_match,
    extract_answer,
    normalize_answer,
    normalize_number,
    parse_number,
)
from imm_ray.verify.math_verifier import MathVerifier, math_verify_pair
from imm_ray.verify.timeout_pool import TaskOutcome, TimeoutPool
from imm_ray.verify.verifiers import (
    VERIFIERS,
    NumericVerifier,
    Verdict,
    Verifier,
    get_verifier,
    register_verifier,
    select_accepted,
    verify_batch,
)

__all__ = [
    "VERIFIERS",
    "MathVerifier",
    "NumericVerifier",
    "TaskOutcome",
    "TimeoutPool",
    "Verdict",
    "Verifier",
    "answers_match",
    "extract_answer",
    "get_verifier",
    "math_verify_pair",
    "normalize_answer",
    "normalize_number",
    "parse_number",
    "register_verifier",
    "select_accepted",
    "verify_batch",
]
