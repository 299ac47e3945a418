"""The vLLM entropy recorder and its reader (no engine: the processor fed batch updates by hand),
and the engine helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from imm_ray.generate.engine import Completion, SamplingSpec, collect, entropy_mask
from imm_ray.generate.entropy import token_entropy
from imm_ray.generate.vllm_entropy import RECORD, EntropyReader, EntropyRecorder, sample_entropies


def records(rows: list[tuple[int, int, int, int, float]]) -> np.ndarray:
    return np.array(rows, dtype=RECORD)


def test_sample_entropies_tell_samples_apart_by_their_tokens():
    # request 7, two samples: A = [5, 6, 7] (uid 1), B = [5, 8, 9] (uid 2), records interleaved; the
    # distribution at a position depends on the tokens before it only, so they differ from pos 2 on
    recs = records([(1, 7, 0, -1, 0.1), (2, 7, 0, -1, 0.1), (2, 7, 1, 5, 0.2), (1, 7, 1, 5, 0.2),
                    (1, 7, 2, 6, 0.3), (2, 7, 2, 8, 0.9), (2, 7, 3, 9, 0.4)])  # B ran a step past its stop string
    got = sample_entropies(recs, [[5, 8, 9], [5, 6, 7]], 7)
    assert got == [pytest.approx((0.1, 0.2, 0.9)), pytest.approx((0.1, 0.2, 0.3))]


def test_sample_entropies_last_record_of_a_position_wins_and_unknown_tokens_match_any():
    # pos 0 recorded twice (a chunked prefill's first, partial step, then the real one); tok -1: a
    # placeholder of an engine that schedules ahead
    recs = records([(1, 0, 0, -1, 9.0), (1, 0, 0, -1, 0.5), (1, 0, 1, -1, 0.6)])
    assert sample_entropies(recs, [[3, 4]], 0) == [pytest.approx((0.5, 0.6))]
    # equal samples share equal records
    assert sample_entropies(recs, [[3, 4], [3, 4]], 0) == [pytest.approx((0.5, 0.6))] * 2


def test_sample_entropies_raise_when_a_sample_has_no_records():
    recs = records([(1, 0, 0, -1, 0.5), (1, 0, 1, 3, 0.6)])
    with pytest.raises(RuntimeError, match="sample 0 of request 0"):
        sample_entropies(recs, [[4, 4]], 0)  # other tokens
    with pytest.raises(RuntimeError, match="3 tokens"):
        sample_entropies(recs, [[3, 4, 5]], 0)  # longer than recorded
    with pytest.raises(RuntimeError, match="0 samples recorded"):
        sample_entropies(records([]), [[1]], 0)


def test_recorder_writes_the_top_k_entropy_of_the_rows_that_ask_only(tmp_path):
    """Three rows, two ask (top 3 and top 5); after a move and a removal the records still follow
    their samples; the logits are returned untouched."""
    reader = EntropyReader(tmp_path / "e.bin")
    proc = EntropyRecorder(None, torch.device("cpu"), False)
    outputs = [[], [], []]
    plain = SamplingParams(max_tokens=4)
    ask = [SamplingParams(max_tokens=4, extra_args=reader.extra_args(key, k)) for key, k in ((0, 3), (2, 5))]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                  added=[(0, ask[0], [1], outputs[0]), (1, plain, [1], outputs[1]),
                                         (2, ask[1], [1], outputs[2])]))
    gen = torch.Generator().manual_seed(0)
    rows, top_k = {0: 0, 2: 2}, {0: 3, 2: 5}  # request key -> its row now
    seen: dict[int, list[float]] = {0: [], 2: []}
    for step in range(3):
        logits = torch.randn(3, 50, generator=gen) * 3
        kept = logits.clone()
        assert proc.apply(logits) is logits and torch.equal(logits, kept)
        for key, row in rows.items():
            seen[key].append(token_entropy(torch.topk(logits[row], top_k[key]).values.tolist()))
            outputs[key].append(10 + step)
        outputs[1].append(10 + step)
        if step == 0:  # the two asking requests swap rows
            proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
            rows = {0: 2, 2: 0}
        if step == 1:  # request 0 (now in row 2) finishes
            proc.update_state(BatchUpdate(batch_size=2, removed=[2], added=[], moved=[]))
            del rows[0]
    assert reader.entropies(0, [outputs[0]]) == [pytest.approx(tuple(seen[0]), abs=1e-5)]
    assert len(seen[0]) == 2 and len(seen[2]) == 3
    assert reader.entropies(2, [outputs[2]]) == [pytest.approx(tuple(seen[2]), abs=1e-5)]
    assert all(0 < e <= math.log(5) for e in seen[2])
    with pytest.raises(RuntimeError):
        reader.entropies(0, [outputs[0]])  # a finished request's records are handed out once
    reader.close()
    assert not (tmp_path / "e.bin").exists()
    with pytest.raises(ValueError, match="top_k"):
        EntropyRecorder.validate_params(SamplingParams(extra_args={"imm_entropy": {"file": "x", "key": 0}}))


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
