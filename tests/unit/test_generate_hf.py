"""The hf engine in this process (no Ray): its eos list, streaming order and entropy sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from imm_ray.data.prompts import encode_prompt, render_prompt
from imm_ray.generate.engine import SamplingSpec, create_engine
from imm_ray.generate.settings import EngineSettings
from tiny_model import TINY_PROBLEMS


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    engine = create_engine("hf", tiny_model_dir, EngineSettings(name="hf", dtype="float32", batch_size=3))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ids(tiny_model_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [encode_prompt(tok, render_prompt(q, "chat", tok, instruction_suffix="")) for q, _, _ in TINY_PROBLEMS]


def test_generation_config_eos_list_is_not_grown_by_generate(hf, ids):
    """Issue 12 defect 17: a list eos_token_id (as in Qwen2.5) grew by one id per generate call."""
    config = hf.model.generation_config
    config.eos_token_id = [hf.tokenizer.eos_token_id, 7]
    greedy = SamplingSpec(n=1, max_tokens=4, seed=None)
    for _ in range(3):
        hf.generate(ids[:1], greedy)
    assert config.eos_token_id == [hf.tokenizer.eos_token_id, 7]


def test_stream_yields_each_batch_as_it_finishes_and_samples_entropy(hf, ids):
    spec = SamplingSpec(n=2, temperature=0.7, max_tokens=6, seed=1, entropy_top_k=5)
    mask = [i % 4 == 0 for i in range(len(ids))]
    batches = list(hf.stream(ids, spec, entropy=mask))
    assert len(batches) == len(ids)  # batch_size 3 // n 2: one prompt per batch
    assert [i for b in batches for i, _ in b] == list(range(len(ids)))
    for b in batches:
        for i, comps in b:
            assert len(comps) == 2
            assert all((c.token_entropies is not None) == mask[i] for c in comps)
    greedy = SamplingSpec(n=1, max_tokens=20, seed=None)
    assert [c[0].text for c in hf.generate(ids, greedy)] == [
        comps[0].text for b in hf.stream(ids, greedy) for _, comps in b]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(hf, ids):
    spec = SamplingSpec(n=2, temperature=5.0, max_tokens=8, seed=7)  # hot: seeds differ visibly
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = hf.generate(ids, spec)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream did not move
    assert hf.generate(ids, spec) == first
    other = hf.generate(ids, SamplingSpec(n=2, temperature=5.0, max_tokens=8, seed=8))
    assert [c.text for cs in other for c in cs] != [c.text for cs in first for c in cs]
