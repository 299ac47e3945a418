"""The streaming generator pool on real vLLM engines in Ray actors: same greedy outputs as
``vllm.LLM.generate``, progress before the end, a killed actor's prompts redone, placement checked."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from transformers import AutoTokenizer

import imm_ray.generate.actors as actors_mod
from imm_ray.data.prompts import encode_prompt, render_prompt
from imm_ray.generate.actors import GeneratorPool, PoolSpec
from imm_ray.generate.engine import EngineOptions, SamplingSpec
from imm_ray.placement import PlacementError
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=48, seed=None)


def prompt_ids(model_dir, repeat: int) -> list[list[int]]:
    """Distinct prompts: each tiny question with a different number of leading spaces."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [encode_prompt(tok, render_prompt(" " * r + q, "chat", tok, instruction_suffix=""))
            for r in range(repeat) for q, _, _ in TINY_PROBLEMS]


def vllm_spec(num_actors: int, **extra) -> PoolSpec:
    options = EngineOptions(dtype="float32", max_model_len=512, kv_cache_gb=1, extra=extra)
    return PoolSpec(engine="vllm", options=options, num_actors=num_actors, num_cpus=1, max_retries=2)


class RecordingBar:
    """Stands in for tqdm: records (time, prompts) of every update; ``on_update`` runs after each."""

    updates: list[tuple[float, int]] = []
    on_update = None

    def __init__(self, *args, **kwargs) -> None:
        RecordingBar.updates = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        RecordingBar.updates.append((time.monotonic(), n))
        if RecordingBar.on_update is not None:
            RecordingBar.on_update(len(RecordingBar.updates))


def raw_llm_generate(actor, prompts: list[list[int]], sampling: SamplingSpec) -> list[str]:
    """What the pool did before streaming: ``vllm.LLM.generate`` on the actor's own engine."""

    def call(self, prompts, max_tokens):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                        SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    return ray.get(actor.__ray_call__.remote(call, prompts, sampling.max_tokens))


def test_streaming_pool_matches_llm_generate_and_advances_before_the_end(ray_local, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(actors_mod, "tqdm", RecordingBar)
    ids = prompt_ids(tiny_model_dir, 6)  # 48 prompts of different answer lengths
    pool = GeneratorPool(vllm_spec(1, max_num_seqs=8), progress=True)  # 8 at a time: several waves
    try:
        pool.load(tiny_model_dir)
        outs = pool.generate(ids, GREEDY)
        assert [o[0].text for o in outs] == raw_llm_generate(pool.actors[0], ids, GREEDY)
        updates = RecordingBar.updates
        assert sum(n for _, n in updates) == len(ids) and len(updates) >= 3
        assert updates[0][0] < updates[-1][0]  # the first prompts came back before the last ones
        stats = pool.last_stats
        assert stats.prompts == stats.completions == len(ids) and stats.retries == 0
        assert stats.tokens == sum(o[0].num_tokens for o in outs) and stats.tokens_per_s > 0
        # k samples per question stay one request; entropy only on every entropy_stride-th prompt
        sampled = pool.generate(ids[:8], SamplingSpec(n=3, temperature=0.8, max_tokens=16, seed=0,
                                                      entropy_top_k=5, entropy_stride=4))
        assert [len(o) for o in sampled] == [3] * 8
        assert [all(c.token_entropies is not None for c in o) for o in sampled] == [i % 4 == 0 for i in range(8)]
    finally:
        pool.shutdown()


def test_killed_actor_and_engine_are_replaced_and_only_unfinished_prompts_redone(
        ray_local, scrambled_model, monkeypatch):
    import psutil

    monkeypatch.setattr(actors_mod, "tqdm", RecordingBar)
    ids = prompt_ids(scrambled_model, 4)  # 32 prompts, 16 per actor, 4 at a time per engine
    pool = GeneratorPool(vllm_spec(2, max_num_seqs=4), progress=True)
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=40, seed=None)
    killed: list[int] = []

    def kill_actor_zero(updates: int) -> None:
        if updates == 1 and not killed:  # mid-round: after the first prompts came back
            killed.extend(ray.get(pool.actors[0].pids.remote()))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    try:
        pool.load(scrambled_model)
        reference = [o[0].text for o in pool.generate(ids, spec)]
        RecordingBar.on_update = kill_actor_zero
        outs = pool.generate(ids, spec)
        assert len(killed) >= 2, "the actor and its engine-core process were both killed"
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in killed)
        assert pool.last_stats.retries == 1
        assert [len(o) for o in outs] == [1] * len(ids)  # every prompt once
        assert [o[0].text for o in outs] == reference  # each in its place
        assert sum(n for _, n in RecordingBar.updates) == len(ids)  # nothing counted twice
    finally:
        RecordingBar.on_update = None
        pool.shutdown(graceful=False)


def test_an_impossible_request_fails_in_seconds_naming_the_key(ray_local, tiny_model_dir):
    pool = GeneratorPool(PoolSpec(engine="vllm", options=EngineOptions(), num_actors=1, num_gpus=1), progress=False)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"GPU: 1 \(generate.resources.num_gpus\)"):
        pool.load(tiny_model_dir)
    assert time.monotonic() - t0 < 10
    assert pool.actors == []


def test_entropy_prompts_run_apart_with_the_full_computation_s_entropies(ray_local, tiny_model_dir):
    """The entropy metric's cheap way (every 4th prompt, in engine steps of its own) gives those
    prompts the entropies of the full computation (log-probs on every prompt, all in one batch)."""
    ids = prompt_ids(tiny_model_dir, 4)  # 32 prompts
    full_spec = SamplingSpec(n=1, temperature=0.0, max_tokens=32, seed=None, entropy_top_k=5, entropy_stride=1)
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=32, seed=None, entropy_top_k=5, entropy_stride=4)
    pool = GeneratorPool(vllm_spec(1, max_num_seqs=64), progress=False)

    def finish_order(engine_self, apart: bool, mask: list[bool]) -> list[int]:
        engine_self.engine.entropy_apart = apart
        return [i for batch in engine_self.engine.stream(ids, spec, mask) for i, _ in batch]

    try:
        pool.load(tiny_model_dir)
        assert ray.get(pool.actors[0].__ray_call__.remote(lambda s: s.engine.entropy_apart))  # the CPU default
        full = pool.generate(ids, full_spec)
        cheap = pool.generate(ids, spec)
        # Entropy on the 8 longest answers: apart they finish first, in one batch they finish last.
        longest = sorted(range(len(ids)), key=lambda i: -full[i][0].num_tokens)[:8]
        mask = [i in longest for i in range(len(ids))]
        apart_order = ray.get(pool.actors[0].__ray_call__.remote(finish_order, True, mask))
        mixed_order = ray.get(pool.actors[0].__ray_call__.remote(finish_order, False, mask))
        mixed = pool.generate(ids, spec)
    finally:
        pool.shutdown()
    assert full[longest[-1]][0].num_tokens > min(o[0].num_tokens for o in full)
    assert set(apart_order[:8]) == set(longest) and set(mixed_order[:8]) != set(longest)
    sampled = set(range(0, len(ids), 4))
    for outs in (cheap, mixed):
        assert [o[0].text for o in outs] == [o[0].text for o in full]
        for i, o in enumerate(outs):
            if i in sampled:
                assert o[0].token_entropies == pytest.approx(full[i][0].token_entropies, rel=1e-4, abs=1e-5)
            else:
                assert o[0].token_entropies is None
    assert any(e > 0.01 for i in sampled for e in full[i][0].token_entropies)  # not an all-certain model
    # So the round's metric (the sampled prompts' mean) is the full computation's on them. How far
    # that sample's mean is from the all-prompt mean is a property of the data: on SmolLM2 and
    # GSM8K see entropy_rel_err of tests/bench/bench_generate.py and bench_entropy_cost.py (stated
    # tolerance 5%).


def test_entropies_from_raw_logits_equal_those_from_log_probs(ray_local, tiny_model_dir):
    """The pool's vLLM engine returns raw logits for the entropy metric's top k (no full-vocabulary
    log-softmax per row): renormalised, they give the entropies of vLLM's log-probs."""
    ids = prompt_ids(tiny_model_dir, 1)
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=32, seed=None, entropy_top_k=5, entropy_stride=1)
    outs = {}
    for extra in ({}, {"logprobs_mode": "raw_logprobs"}):
        pool = GeneratorPool(vllm_spec(1, **extra), progress=False)
        try:
            pool.load(tiny_model_dir)
            used = ray.get(pool.actors[0].__ray_call__.remote(
                lambda s: s.engine.llm.llm_engine.vllm_config.model_config.logprobs_mode))
            outs[used] = pool.generate(ids, spec)
        finally:
            pool.shutdown()
    assert set(outs) == {"raw_logits", "raw_logprobs"}  # the default, and the override through extra
    logits, logprobs = outs["raw_logits"], outs["raw_logprobs"]
    assert [o[0].text for o in logits] == [o[0].text for o in logprobs]
    for a, b in zip(logits, logprobs):
        assert a[0].token_entropies == pytest.approx(b[0].token_entropies, rel=1e-4, abs=1e-5)
    assert any(e > 0.01 for o in logits for e in o[0].token_entropies)
