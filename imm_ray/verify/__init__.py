"""Final-answer extraction and verifiers for math reasoning completions (no Ray dependency)."""

from imm_ray.verify.answers import (
    answers_match,
    extract_answer,
    normalize_answer,
    normalize_number,
    parse_number,
)
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
    "NumericVerifier",
    "Verdict",
    "Verifier",
    "answers_match",
    "extract_answer",
    "get_verifier",
    "normalize_answer",
    "normalize_number",
    "parse_number",
    "register_verifier",
    "select_accepted",
    "verify_batch",
]
