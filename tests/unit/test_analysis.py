"""Layer analysis, pure parts: tensor names, relative change and its aggregation, Spearman."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imm_ray.analysis import (
    parameter_change,
    parse_tensor_name,
    rankdata,
    relative_change,
    spearman,
    squared_norms,
    summarize_changes,
)
from imm_ray.analysis.change import SquaredNorms
from imm_ray.analysis.pipeline import split_layers


@pytest.mark.parametrize("name, layer, module, param, group", [
    ("model.layers.12.self_attn.q_proj.weight", 12, "attn_q", "weight", "attention"),
    ("model.layers.0.self_attn.k_proj.bias", 0, "attn_k", "bias", "attention"),
    ("model.layers.3.self_attn.v_proj.weight", 3, "attn_v", "weight", "attention"),
    ("model.layers.3.self_attn.o_proj.weight", 3, "attn_o", "weight", "attention"),
    ("model.layers.7.mlp.gate_proj.weight", 7, "mlp_gate", "weight", "mlp"),
    ("model.layers.7.mlp.up_proj.weight", 7, "mlp_up", "weight", "mlp"),
    ("model.layers.7.mlp.down_proj.weight", 7, "mlp_down", "weight", "mlp"),
    ("model.layers.1.input_layernorm.weight", 1, "norm_input", "weight", "norm"),
    ("model.layers.1.post_attention_layernorm.weight", 1, "norm_post_attn", "weight", "norm"),
    ("model.norm.weight", None, "norm_final", "weight", "norm"),
    ("model.embed_tokens.weight", None, "embed", "weight", "embedding"),
    ("lm_head.weight", None, "lm_head", "weight", "embedding"),
    ("transformer.h.4.attn.c_attn.weight", 4, "c_attn", "weight", "other"),
])
def test_parse_tensor_name(name, layer, module, param, group):
    key = parse_tensor_name(name)
    assert (key.layer, key.module, key.param, key.group) == (layer, module, param, group)


def test_relative_change_hand_worked():
    w0 = np.array([[3.0, 0.0], [0.0, 4.0]], dtype=np.float32)  # ||W0|| = 5
    wt = w0 + np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)  # ||dW|| = 1
    assert relative_change(w0, wt) == pytest.approx(0.2)
    assert relative_change(w0, w0.copy()) == 0.0
    norms = squared_norms(w0.astype(np.float16), wt.astype(np.float16))
    assert (norms.diff, norms.base) == (pytest.approx(1.0), pytest.approx(25.0))
    assert relative_change(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_change(np.zeros(3), np.ones(3)) is None
    with pytest.raises(ValueError, match="shape"):
        relative_change(np.zeros((2, 3)), np.zeros((3, 2)))


def test_summarize_groups_by_layer_and_module():
    entries = [
        ("model.layers.0.self_attn.q_proj.weight", SquaredNorms(diff=1.0, base=4.0)),
        ("model.layers.0.mlp.up_proj.weight", SquaredNorms(diff=3.0, base=12.0)),
        ("model.layers.1.self_attn.q_proj.weight", SquaredNorms(diff=9.0, base=9.0)),
        ("model.embed_tokens.weight", SquaredNorms(diff=0.0, base=100.0)),
        ("model.norm.weight", SquaredNorms(diff=4.0, base=1.0)),
    ]
    s = summarize_changes(entries, num_layers=3)
    assert s.num_layers == 3
    assert s.per_layer[0] == pytest.approx(math.sqrt(4 / 16))  # both tensors of layer 0 pooled
    assert s.per_layer[1] == pytest.approx(1.0)
    assert s.per_layer[2] is None  # no tensor in layer 2
    assert s.per_module["attn_q"] == pytest.approx(math.sqrt(10 / 13))
    assert s.per_module["mlp_up"] == pytest.approx(0.5)
    assert s.per_layer_module["attn_q"] == [pytest.approx(0.5), pytest.approx(1.0), None]
    assert s.per_group["attention"] == pytest.approx(math.sqrt(10 / 13))
    assert s.non_layer == {"embed": 0.0, "norm_final": pytest.approx(2.0)}
    assert s.total == pytest.approx(math.sqrt(17 / 126))
    assert s.tensors["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert summarize_changes(entries).num_layers == 2  # inferred from the names


def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor], layers: int = 2) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return folder


def test_parameter_change_streams_checkpoints(tmp_path):
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    base = _checkpoint(tmp_path / "base", {
        "model.layers.0.self_attn.q_proj.weight": w,
        "model.layers.1.mlp.down_proj.weight": w,
        "model.embed_tokens.weight": w,
    })
    tuned = _checkpoint(tmp_path / "tuned", {
        "model.layers.0.self_attn.q_proj.weight": w + torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        "model.layers.1.mlp.down_proj.weight": w * 2,
        "model.extra.weight": w,
    })
    s = parameter_change(base, tuned)
    assert s.per_layer == [pytest.approx(0.2), pytest.approx(1.0)]
    assert s.missing == ["model.embed_tokens.weight", "model.extra.weight"]
    assert parameter_change(base, base).total == 0.0


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([3, 1, 2]) == [3.0, 1.0, 2.0]
    assert rankdata([5, 5, 5]) == [2.0, 2.0, 2.0]


def test_spearman_small_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5) (scipy: 0.9486833)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 2, 3], [5, 5, 5]) is None  # constant side
    assert spearman([1, None, 3, 2], [1, 7, 3, 2]) == pytest.approx(1.0)  # None pairs dropped
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_split_layers():
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(2, 8) == [[0], [1]]
    assert split_layers(3, 1) == [[0, 1, 2]]


def test_a_run_on_object_storage_is_read_through_the_storage_layer(s3_bucket, tiny_model_dir, tmp_path, monkeypatch):
    """discover_models lists published checkpoints only (as URIs), run.yaml and the references come from
    the bucket, and parameter_change materializes what it compares."""
    from imm_ray.analysis.probes import discover_models, probe_from_run
    from imm_ray.config import load_run_config
    from imm_ray.storage import publish_dir, resolve, write_jsonl, write_text
    from imm_ray.storage.fs import upload_file

    monkeypatch.setenv("IMM_NODE_CACHE_DIR", str(tmp_path / "cache"))
    root = resolve(s3_bucket) / "run"
    for rel in ("imm/round-001/sft", "imm/round-001/merged", "si/round-002/sft"):
        publish_dir(tiny_model_dir, root / rel)
    for f in Path(tiny_model_dir).iterdir():  # an upload that never finished (no manifest)
        upload_file(f, root / "si/round-003/sft" / f.name)
    write_text(root / "run.yaml", json.dumps({"data": {"eval": [{"name": "t", "path": str(tmp_path / "t.jsonl")}]}}))
    (tmp_path / "t.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    write_jsonl(root / "imm/round-001/accepted.jsonl", [{"problem_id": "a", "prompt": "p", "completion": "c"}])

    assert [(e.label, e.path) for e in discover_models(root.uri)] == [
        ("imm/r1/sft", f"{root.uri}/imm/round-001/sft"), ("imm/r1/merged", f"{root.uri}/imm/round-001/merged"),
        ("si/r2/sft", f"{root.uri}/si/round-002/sft")]
    assert load_run_config(root.uri).data.eval[0].name == "t"
    probe, source = probe_from_run(root.uri)
    assert source == f"{root.uri}/imm/round-001/accepted.jsonl" and [r.completion for r in probe.references] == ["c"]
    change = parameter_change(f"{root.uri}/imm/round-001/sft", tiny_model_dir)
    assert change.total == 0.0  # the same weights, read from the bucket through this node's cache
