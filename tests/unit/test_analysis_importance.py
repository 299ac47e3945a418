"""Layer skipping and importance on the tiny memorising model (forward passes, short generation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imm_ray.analysis import (
    ProbeSpec,
    PromptStyle,
    layer_importance,
    reference_loss,
    skip_layers,
)
from imm_ray.analysis.importance import decoder_layers, load_model
from imm_ray.analysis.pipeline import AnalysisPlan, run_analysis
from imm_ray.analysis.probes import ModelEntry, read_references
from imm_ray.data import Problem
from imm_ray.storage import StorageError
from imm_ray.train.sft_data import SFTRow
from tiny_model import TINY_PROBLEMS

STYLE = PromptStyle("chat", None, "")  # the tiny model memorised prompts without a suffix


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def _references(tokenizer) -> tuple[SFTRow, ...]:
    return tuple(SFTRow(STYLE.render(q, tokenizer), s) for q, s, _ in TINY_PROBLEMS)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_skip_nothing_is_identity_and_skip_changes_output(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    plain = _logits(model, ids)
    with skip_layers(model, []):
        assert torch.equal(_logits(model, ids), plain)
    for layer in (0, 1):
        with skip_layers(model, [layer]):
            assert len(decoder_layers(model)) == 1
            assert not torch.allclose(_logits(model, ids), plain)
    # restored: same stack, same layer indices, same output
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    assert torch.equal(_logits(model, ids), plain)


def test_skip_equals_identity_on_the_residual_stream(tiny, monkeypatch):
    model, _ = tiny
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with skip_layers(model, [0]):
        removed = _logits(model, ids)
    layer = decoder_layers(model)[0]
    monkeypatch.setattr(layer, "forward", lambda hidden_states, *args, **kwargs: hidden_states)
    assert torch.allclose(_logits(model, ids), removed, atol=1e-6)


def test_skipped_generation_with_cache_matches_without(tiny):
    model, tokenizer = tiny
    prompt = tokenizer(STYLE.render(TINY_PROBLEMS[0][0], tokenizer), return_tensors="pt")["input_ids"]
    with skip_layers(model, [0]), torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_reference_loss_rises_when_a_layer_is_skipped(tiny):
    model, tokenizer = tiny
    refs = _references(tokenizer)
    base = reference_loss(model, tokenizer, refs, batch_size=4)
    assert base is not None and 0 <= base < 0.5  # memorised
    for layer in (0, 1):
        with skip_layers(model, [layer]):
            assert reference_loss(model, tokenizer, refs) >= base - 1e-6
    assert reference_loss(model, tokenizer, ()) is None


def test_layer_importance_accuracy_probe(tiny_model_dir):
    problems = tuple(Problem(f"t{i}", q, a, "tiny") for i, (q, _, a) in enumerate(TINY_PROBLEMS[:2]))
    probe = ProbeSpec(problems=problems, prompt=STYLE, max_new_tokens=16)
    scores = layer_importance(tiny_model_dir, [None, 0], probe, generate=True, loss=False)
    assert [s.layer for s in scores] == [None, 0]
    assert scores[0].accuracy == 1.0 and len(scores[0].completions) == 2
    assert scores[1].accuracy < 1.0 and scores[1].completions == []


def _perturbed_copy(src: Path, dst: Path, scale: float) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if ".layers.1." in name:
            weights[name] = tensor + scale * torch.randn(tensor.shape, generator=gen)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_run_analysis_locally_with_loss_proxy(tiny_model_dir, tiny, tmp_path):
    _, tokenizer = tiny
    tuned = _perturbed_copy(tiny_model_dir, tmp_path / "tuned", 0.01)
    plan = AnalysisPlan(original=tiny_model_dir, models=[ModelEntry("si", 1, "sft", tuned)],
                        probe=ProbeSpec(references=_references(tokenizer), prompt=STYLE),
                        measures=("loss",), num_tasks=2)
    result = run_analysis(plan)
    imp = result["importance"]
    assert [row["layer"] for row in imp["layers"]] == [0, 1]
    assert all(row["loss_rise"] >= -1e-6 for row in imp["layers"])
    change = result["models"][0]["change"]
    assert change["per_layer"][0] == 0.0 and change["per_layer"][1] > 0
    assert set(result["models"][0]["spearman"]) == {"loss_rise"}


def test_analyze_cli_explicit_checkpoints(tiny_model_dir, tmp_path):
    import argparse
    import json

    from imm_ray.analysis.cli import add_analyze_arguments, run_analyze_cli
    from imm_ray.errors import UsageError

    tuned = _perturbed_copy(tiny_model_dir, tmp_path / "tuned", 0.01)
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    out = tmp_path / "a.json"
    args = ["--original", str(tiny_model_dir), "--model", f"mine={tuned}", "--no-ray", "--out", str(out)]
    assert run_analyze_cli(parser.parse_args(args + ["--measures", "none"])) == 0
    result = json.loads(out.read_text())
    assert result["importance"] is None
    assert (result["models"][0]["arm"], result["models"][0]["kind"]) == ("mine", "model")
    assert result["models"][0]["change"]["per_layer"][1] > 0
    with pytest.raises(UsageError, match="needs a probe"):
        run_analyze_cli(parser.parse_args(args))
    with pytest.raises(UsageError, match="--out FILE"):
        run_analyze_cli(parser.parse_args(args[:2] + ["--no-ray"]))


def test_references_one_per_problem_from_accepted_rows(tmp_path: Path):
    rows = [{"problem_id": "a", "prompt": "P1", "completion": "S1"},
            {"problem_id": "a", "prompt": "P1", "completion": "S1 again"},
            {"problem_id": "b", "prompt": "P2", "completion": "S2"},
            {"problem_id": "c", "prompt": "P3"},  # no solution: skipped
            {"prompt": "P4", "completion": "S4"}]
    path = tmp_path / "accepted.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_references(path) == [SFTRow("P1", "S1"), SFTRow("P2", "S2"), SFTRow("P4", "S4")]
    assert read_references(path, limit=1) == [SFTRow("P1", "S1")]
    path.write_text('{"problem_id": "a"\n')
    with pytest.raises(StorageError, match=r"accepted\.jsonl:1: invalid JSON"):
        read_references(path)
