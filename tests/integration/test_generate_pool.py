"""The streaming generator pool on real vLLM engines in Ray actors: same greedy outputs as
``vllm.LLM.generate``, progress before the end, a killed actor's prompts redone, placement checked."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import ray
from transformers import AutoTokenizer

import imm_ray.generate.actors as actors_mod
from imm_ray.data.prompts import encode_prompt, render_prompt
from imm_ray.generate.actors import GeneratorPool, PoolSpec
from imm_ray.generate.engine import SamplingSpec, collect
from imm_ray.generate.entropy import token_entropy
from imm_ray.generate.settings import EngineSettings
from imm_ray.placement import PlacementError
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=48, seed=None)


def prompt_ids(model_dir, repeat: int) -> list[list[int]]:
    """Distinct prompts: each tiny question with a different number of leading spaces."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [encode_prompt(tok, render_prompt(" " * r + q, "chat", tok, instruction_suffix=""))
            for r in range(repeat) for q, _, _ in TINY_PROBLEMS]


def vllm_spec(num_actors: int, block_size: int | None = None, **extra) -> PoolSpec:
    options = EngineSettings(dtype="float32", max_model_len=512, kv_cache_gb=1, block_size=block_size, extra=extra)
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


@pytest.fixture(scope="module")
def tiny_pool(ray_local, tiny_model_dir):
    """One vLLM actor on the tiny model, 8 sequences at a time, shared by the tests that only read it
    (an engine start is most of their time)."""
    pool = GeneratorPool(vllm_spec(1, max_num_seqs=8), progress=True)  # 8 at a time: several waves
    try:
        pool.load(tiny_model_dir)
        yield pool
    finally:
        pool.shutdown()


def test_streaming_pool_matches_llm_generate_and_advances_before_the_end(tiny_pool, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(actors_mod, "tqdm", RecordingBar)
    ids = prompt_ids(tiny_model_dir, 6)  # 48 prompts of different answer lengths
    pool = tiny_pool
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


def top_k_entropies(positions: list[list[float]]) -> list[float]:
    """The full computation: per position, the entropy of vLLM's own top-k log-probs, renormalised."""
    return [token_entropy(top) for top in positions]


def test_recorded_entropies_equal_those_of_vllm_s_log_probs(tiny_pool, tiny_model_dir):
    """The engine's logits processor gives every entropy_stride-th prompt the entropies of vLLM's
    top-k log-probs (the full computation), leaves the other prompts without, and changes no output."""
    ids = prompt_ids(tiny_model_dir, 4)  # 32 prompts
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=32, seed=None, entropy_top_k=5, entropy_stride=4)

    def reference(actor_self) -> list[list[list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5)
        outs = actor_self.engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return [[[lp.logprob for lp in pos.values() if lp.rank <= 5] for pos in r.outputs[0].logprobs] for r in outs]

    plain = tiny_pool.generate(ids, replace(spec, entropy_top_k=0))
    cheap = tiny_pool.generate(ids, spec)
    full = [top_k_entropies(r) for r in ray.get(tiny_pool.actors[0].__ray_call__.remote(reference))]
    assert [o[0].text for o in cheap] == [o[0].text for o in plain]
    for i, o in enumerate(cheap):
        if i % 4 == 0:
            assert len(o[0].token_entropies) == o[0].num_tokens
            assert o[0].token_entropies == pytest.approx(full[i], rel=1e-4, abs=1e-5)
        else:
            assert o[0].token_entropies is None
    assert any(e > 0.01 for i in range(0, len(ids), 4) for e in full[i])  # not an all-certain model
    # The round's metric (the sampled prompts' mean) is thus the full computation's on them. How far
    # that sample's mean is from the all-prompt mean is a property of the data: on SmolLM2 and GSM8K
    # see entropy_rel_err of tests/bench/bench_generate.py and bench_entropy_cost.py (stated tolerance 5%).


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
    pool = GeneratorPool(PoolSpec(engine="vllm", options=EngineSettings(), num_actors=1, num_gpus=1), progress=False)
    # The up-front refusal ("but none of ... offers"), not the placement timeout's message.
    with pytest.raises(PlacementError, match=r"GPU: 1 \(generate.resources.num_gpus\), but none of"):
        pool.load(tiny_model_dir)
    assert pool.actors == []


@pytest.mark.parametrize("block_size", [None, 32], ids=["blocks-128", "blocks-32"])
def test_each_of_n_samples_gets_its_own_entropies(ray_local, tiny_model_dir, block_size):
    """n = 4 sampled continuations of one request: each gets the entropies of its own tokens, checked
    by scoring prompt + continuation with vLLM's prompt log-probs (the same model, teacher-forced).
    At temperature 2 the tiny model's samples differ; a KV cache of 768 tokens for 12 samples of up
    to 250 tokens makes vLLM preempt and recompute them. With 32-token blocks the samples of a
    request share their prompt's full blocks (prefix caching), with vLLM's CPU default (128) none."""
    ids = prompt_ids(tiny_model_dir, 41)[-3:]  # 40 leading spaces: prompts of 50+ tokens
    assert min(map(len, ids)) >= 32  # at least one full 32-token block to share
    spec = SamplingSpec(n=4, temperature=2.0, max_tokens=200, seed=None, entropy_top_k=5, entropy_stride=1)

    def generate_and_score(actor_self) -> list[tuple[list[int], list[float], list[list[float]]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine, tokens = actor_self.engine, {}
        completions = engine._completions

        def keep_tokens(req, sampling, reader=None, key=0):  # the samples' token ids, beside the product's output
            tokens[key] = [list(o.token_ids) for o in req.outputs]
            return completions(req, sampling, reader, key)

        engine._completions = keep_tokens
        outs = collect(engine.stream(ids, spec), len(ids))
        found = []
        for i, (p, o) in enumerate(zip(ids, outs)):
            for c, t in zip(o, tokens[i]):
                scored = engine.llm.generate(TokensPrompt(prompt_token_ids=p + t),
                                             SamplingParams(max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
                found.append((t, list(c.token_entropies), [[lp.logprob for lp in pos.values() if lp.rank <= 5]
                                                           for pos in scored.prompt_logprobs[len(p):]]))
        return found

    pool = GeneratorPool(vllm_spec(1, block_size, num_gpu_blocks_override=768 // (block_size or 128)),
                         progress=False)
    try:
        pool.load(tiny_model_dir)
        pairs = ray.get(pool.actors[0].__ray_call__.remote(generate_and_score))
    finally:
        pool.shutdown()
    assert len({tuple(t) for t, _, _ in pairs}) > len(ids)  # the samples of a request differ
    spread = [max(abs(a - b) for a, b in zip(x, y)) for (_, x, _), (_, y, _) in zip(pairs, pairs[1:])]
    assert max(spread) > 0.1  # and so do their entropies: a sample given another's would fail
    for _, got, scored in pairs:
        assert got == pytest.approx(top_k_entropies(scored), rel=1e-3, abs=1e-4)
