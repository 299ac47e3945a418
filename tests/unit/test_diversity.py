"""Collapse metrics: distinct-n, BLEU / self-BLEU, distinct answers, token entropy."""

from __future__ import annotations

import math

import pytest

from imm_ray.evaluate import (
    bleu,
    distinct_n,
    diversity_metrics,
    group_by_question,
    mean_token_entropy,
    self_bleu,
)
from imm_ray.generate.entropy import token_entropy


def test_distinct_n_hand_worked() -> None:
    texts = ["a b a", "a b c"]  # unigrams a,b,a,a,b,c: 3 unique of 6
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab, ba, ab, bc
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)  # aba, abc
    assert distinct_n(texts, 4) is None  # no 4-gram at all
    assert distinct_n(["x y", "x y"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["A a"], 1, tokenize=lambda s: s.lower().split()) == pytest.approx(1 / 2)


def test_bleu_hand_worked() -> None:
    same = "the cat sat on the mat".split()
    assert bleu(same, [same]) == pytest.approx(1.0)
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat": precisions 5/6, 3/5, 2/4, 1/3,
    # equal lengths (no brevity penalty): BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    hyp = "the cat sat on a mat".split()
    assert bleu(hyp, [same]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Clipping and the brevity penalty: hyp "the the" vs ref "the cat": p1 = 1/2 (clipped),
    # p2 = 0 -> 0.1/1 (smoothing), p3 and p4 have no n-grams -> 0.1/1; no penalty (same length).
    assert bleu("the the".split(), [["the", "cat"]]) == pytest.approx((0.5 * 0.1 * 0.1 * 0.1) ** 0.25)
    # A shorter hypothesis (3 tokens vs 6) pays exp(1 - 6/3).
    short = bleu("the cat sat".split(), [same])
    assert short == pytest.approx(math.exp(1 - 6 / 3) * (1 * 1 * 1 * 0.1) ** 0.25)
    assert bleu("x y".split(), [same]) == 0.0  # no unigram in common
    assert bleu([], [same]) == 0.0


def test_self_bleu() -> None:
    assert self_bleu(["a b c d e", "a b c d e", "a b c d e"]) == pytest.approx(1.0)
    diverse = self_bleu(["one two three four", "five six seven eight", "nine ten eleven twelve"])
    assert diverse == 0.0
    texts = ["the cat sat on the mat", "the cat sat on a mat"]
    a, b = (t.split() for t in texts)
    assert self_bleu(texts) == pytest.approx((bleu(a, [b]) + bleu(b, [a])) / 2)
    assert self_bleu(["only one"]) is None


def test_token_entropy() -> None:
    assert token_entropy([0.0]) == pytest.approx(0.0)
    assert token_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    assert token_entropy({"a": math.log(0.25), "b": math.log(0.25)}) == pytest.approx(math.log(2))  # renormalised
    assert mean_token_entropy([[1.0, 2.0], [3.0]]) == pytest.approx(2.0)
    assert mean_token_entropy([]) is None


def test_diversity_metrics_per_question_average() -> None:
    samples = {
        "q1": ["x is 5. The answer is 5.", "x is 5. The answer is 5."],  # collapsed
        "q2": ["so 3 The answer is 3.", "maybe 4 The answer is 4."],
    }
    m = diversity_metrics(samples, token_entropies={"q1": [[0.0, 0.0], [0.0]], "q2": [[1.5]]})
    assert (m["questions"], m["samples"]) == (2, 4)
    q1_d1 = distinct_n(samples["q1"], 1)
    q2_d1 = distinct_n(samples["q2"], 1)
    assert m["distinct_1"] == pytest.approx((q1_d1 + q2_d1) / 2)
    assert m["self_bleu"] == pytest.approx((1.0 + self_bleu(samples["q2"])) / 2)
    assert m["distinct_answers"] == pytest.approx((1 + 2) / 2)  # answers from extract_answer
    assert m["mean_token_entropy"] == pytest.approx(1.5 / 4)
    given = diversity_metrics(samples, answers_by_question={"q1": ["5", None], "q2": ["3", "3"]})
    assert given["distinct_answers"] == pytest.approx(1.0)
    assert given["mean_token_entropy"] is None
    assert set(given) >= {"distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu"}
    single = diversity_metrics({"q": ["a"]})
    assert single["self_bleu"] is None and single["distinct_2"] is None


def test_group_by_question_feeds_diversity_metrics() -> None:
    rows = [
        {"problem_id": "a", "completion": "The answer is 1.", "extracted": "1"},
        {"problem_id": "b", "completion": "The answer is 2.", "extracted": None},
        {"problem_id": "a", "completion": "The answer is 3.", "extracted": "3"},
    ]
    samples = group_by_question(rows)
    assert samples == {"a": ["The answer is 1.", "The answer is 3."], "b": ["The answer is 2."]}
    answers = group_by_question(rows, field="extracted")
    assert diversity_metrics(samples, answers)["distinct_answers"] == pytest.approx((2 + 0) / 2)
