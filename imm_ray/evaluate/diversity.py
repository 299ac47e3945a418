"""Collapse metrics over the k samples a model writes for each question (pure, no model needed).

All text metrics work on tokens from a `tokenize` callable; the default is whitespace splitting
(``str.split``: case kept, punctuation stays attached), which needs no model and is stable
across checkpoints. Pass a tokenizer's ``tokenize`` to work on model tokens instead.

Every metric is computed per question over that question's samples and then averaged over the
questions where it is defined, so it measures how varied the answers to the *same* question are
(variety across different questions is not collapse):

- distinct-n (n = 1..4): unique n-grams / total n-grams, pooled over the question's samples;
- self-BLEU: mean over samples of BLEU-4 of the sample against the question's other samples
  (multi-reference); questions with fewer than 2 samples are skipped. Higher = less diverse;
- distinct answers: number of different final answers among the samples (unparseable ones do
  not count), answers from extract_answer unless given;
- mean token entropy: mean over all generated tokens of the per-token entropy (nats), when
  per-token entropies (or distributions, see imm_ray.generate.entropy) are supplied.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from imm_ray.verify.answers import extract_answer, normalize_answer

__all__ = [
    "Tokenize",
    "bleu",
    "diversity_metrics",
    "distinct_n",
    "group_by_question",
    "mean_token_entropy",
    "self_bleu",
]

Tokenize = Callable[[str], Sequence[str]]
BLEU_EPSILON = 0.1  # Chen & Cherry (2014) smoothing method 1, as in nltk's SmoothingFunction.method1


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: Sequence[str], n: int, tokenize: Tokenize = str.split) -> float | None:
    """Unique n-grams / total n-grams over all texts together; None when there is no n-gram."""
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        counts.update(_ngrams(tokenize(text), n))
    total = sum(counts.values())
    return len(counts) / total if total else None


def bleu(
    hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Sentence BLEU-max_n (uniform weights) of a token list against reference token lists.

    Clipped n-gram precisions (clip = max count in any one reference); a precision whose match
    count is 0 becomes BLEU_EPSILON / total (smoothing method 1, so a short but close sample is
    not scored 0); brevity penalty against the reference length closest to the hypothesis
    length (the shorter one on ties). 0.0 for an empty hypothesis, no references, or no
    unigram in common with any reference.
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = _ngrams(hypothesis, n)
        total = max(1, sum(hyp.values()))
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, n)
        matches = sum(min(count, max_ref[gram]) for gram, count in hyp.items())
        if n == 1 and matches == 0:
            return 0.0  # nothing in common at all (nltk's sentence_bleu does the same)
        log_precision += math.log((matches or BLEU_EPSILON) / total) / max_n
    hyp_len = len(hypothesis)
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in references)[1]
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], tokenize: Tokenize = str.split, max_n: int = 4) -> float | None:
    """Mean BLEU of each text against all the others; None for fewer than 2 texts."""
    if len(texts) < 2:
        return None
    tokens = [list(tokenize(t)) for t in texts]
    scores = [bleu(tokens[i], tokens[:i] + tokens[i + 1 :], max_n) for i in range(len(tokens))]
    return sum(scores) / len(scores)


def mean_token_entropy(entropies: Sequence[Sequence[float]]) -> float | None:
    """Mean over all tokens of per-token entropies, given per sample; None if no token."""
    flat = [e for sample in entropies for e in sample]
    return sum(flat) / len(flat) if flat else None


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _distinct_answers(answers: Sequence[str | None]) -> int:
    return len({normalize_answer(a) for a in answers if a is not None})


def group_by_question(
    rows: Sequence[Mapping[str, Any]], field: str = "completion", key: str = "problem_id"
) -> dict[str, list[Any]]:
    """{row[key]: [row[field], ...]} in row order, e.g. samples.jsonl rows -> samples_by_question
    (with field="extracted" on verified rows: answers_by_question)."""
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(str(row[key]), []).append(row.get(field))
    return grouped


def diversity_metrics(
    samples_by_question: Mapping[str, Sequence[str]],
    answers_by_question: Mapping[str, Sequence[str | None]] | None = None,
    token_entropies: Mapping[str, Sequence[Sequence[float]]] | None = None,
    tokenize: Tokenize = str.split,
    max_n: int = 4,
) -> dict[str, Any]:
    """Collapse metrics of k samples per question (see the module docstring for definitions).

    samples_by_question: question id -> its sample texts. answers_by_question: the same ids ->
    each sample's extracted final answer (None = unparseable); default: extract_answer on each
    sample. token_entropies: question id -> per sample, per generated token entropy (nats);
    "mean_token_entropy" is None without it.

    Returns {"questions", "samples", "distinct_1".."distinct_{max_n}", "self_bleu",
    "distinct_answers", "mean_token_entropy"}; a metric undefined on every question is None.
    """
    ids = list(samples_by_question)
    result: dict[str, Any] = {
        "questions": len(ids),
        "samples": sum(len(samples_by_question[q]) for q in ids),
    }
    for n in range(1, max_n + 1):
        result[f"distinct_{n}"] = _mean([distinct_n(samples_by_question[q], n, tokenize) for q in ids])
    result["self_bleu"] = _mean([self_bleu(samples_by_question[q], tokenize, max_n) for q in ids])
    answers = answers_by_question or {
        q: [extract_answer(text) for text in samples_by_question[q]] for q in ids
    }
    result["distinct_answers"] = _mean([float(_distinct_answers(answers.get(q, []))) for q in ids])
    result["mean_token_entropy"] = (
        mean_token_entropy([s for q in ids for s in token_entropies.get(q, [])])
        if token_entropies is not None
        else None
    )
    return result
