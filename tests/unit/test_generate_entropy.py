"""Vectorised token entropies equal the per-token reference, and the engine helpers."""

from __future__ import annotations

import math
import random

import pytest

from imm_ray.evaluate.diversity import token_entropy
from imm_ray.generate.engine import Completion, SamplingSpec, collect, entropy_mask
from imm_ray.generate.entropy import flat_entropies


def test_flat_entropies_match_token_entropy_per_position():
    rng = random.Random(0)
    positions, k = [], 5
    for _ in range(50):
        m = rng.randint(1, k + 1)  # top k, plus the sampled token when it is outside the top k
        lps = sorted((math.log(rng.random() + 1e-9) * rng.uniform(0.1, 5) for _ in range(m)), reverse=True)
        ranks = list(range(1, m + 1)) if m <= k else [rng.randint(k + 1, 100)] + list(range(1, k + 1))
        positions.append((lps, ranks))
    starts, ends, flat_lp, flat_rank = [], [], [], []
    for lps, ranks in positions:
        starts.append(len(flat_lp))
        flat_lp += lps
        flat_rank += ranks
        ends.append(len(flat_lp))
    got = flat_entropies(starts, ends, flat_lp, flat_rank, k)
    want = [token_entropy([lp for lp, r in zip(lps, ranks) if r <= k]) for lps, ranks in positions]
    assert got == pytest.approx(want, abs=1e-9)


def test_flat_entropies_edge_cases():
    assert flat_entropies([], [], []) == ()
    # one certain token, a uniform pair, a position with nothing finite
    got = flat_entropies([0, 1, 3], [1, 3, 4], [0.0, math.log(0.5), math.log(0.5), -math.inf])
    assert got == pytest.approx([0.0, math.log(2), 0.0])
    with pytest.raises(ValueError, match="contiguous"):
        flat_entropies([0, 2], [1, 3], [0.0, 0.0, 0.0])


def test_entropy_mask_samples_every_stride_th_prompt_by_round_index():
    spec = SamplingSpec(entropy_top_k=20, entropy_stride=4)
    assert entropy_mask([0, 1, 4, 7, 8], spec) == [True, False, True, False, True]
    assert entropy_mask([0, 1], SamplingSpec(entropy_top_k=0)) == [False, False]
    assert entropy_mask([3, 5], SamplingSpec(entropy_top_k=5, entropy_stride=1)) == [True, True]


def test_collect_orders_batches_and_names_missing_prompts():
    a, b = Completion("a", "stop", 1), Completion("b", "stop", 1)
    assert collect(iter([[(1, [b])], [(0, [a])]]), 2) == [[a], [b]]
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        collect(iter([[(0, [a])]]), 2)


def test_flat_entropies_leave_out_the_sampled_token_listed_first():
    """vLLM's flat log-probs list the sampled token first, then the top k: when the sampled token
    is among the top k it appears twice (a dict of log-probs keeps it once)."""
    k = 3
    top = [math.log(0.5), math.log(0.3), math.log(0.2)]
    # position 0 sampled the top token (a duplicate), position 1 a token outside the top k
    flat_lp = [top[0], *top, math.log(0.01), *top]
    flat_rank = [1, 1, 2, 3, 40, 1, 2, 3]
    got = flat_entropies([0, 4], [4, 8], flat_lp, flat_rank, k, sampled_first=True)
    assert got == pytest.approx([token_entropy(top)] * 2)
    assert flat_entropies([0, 4], [4, 8], flat_lp, flat_rank, k)[0] != pytest.approx(token_entropy(top))
