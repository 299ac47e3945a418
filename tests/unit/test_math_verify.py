"""The `math` verifier on real math-verify equivalences (LaTeX fractions, roots, plain numbers)."""

from __future__ import annotations

import pytest

from imm_ray.verify import VERIFIERS, MathVerifier, get_verifier, verify_batch

pytest.importorskip("math_verify")


def test_math_verifier_is_registered() -> None:
    assert VERIFIERS["math"] is MathVerifier
    verifier = get_verifier("math", timeout_s=2.0, workers=1)  # no worker starts before use
    assert isinstance(verifier, MathVerifier) and verifier.timeout_s == 2.0
    verifier.close()


def test_math_verifier_real_equivalences() -> None:
    items = [
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("So the result is $0.5$.", "\\frac{1}{2}"),
        ("Hence $\\boxed{\\sqrt{2}/2}$.", "\\frac{\\sqrt2}{2}"),
        ("Therefore $\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\sqrt{2}/2"),
        ("The answer is 18.", "18"),
        ("The answer is $\\boxed{3}$.", "4"),
        ("I cannot solve this.", "4"),
    ]
    with MathVerifier(workers=1) as verifier:
        verdicts = verify_batch(items, verifier=verifier)
        assert [v.correct for v in verdicts] == [True, True, True, True, True, False, False]
        assert verdicts[0].extracted == verdicts[1].extracted == "0.5"  # 1/2 and 0.5 vote together
        assert verdicts[6].extracted is None and not any(v.timed_out for v in verdicts)
        assert verifier.verify("$x = \\frac{3}{4}$", "0.75").correct
