"""The worker loop end to end on the tiny model with Ray Train's edges faked (no Ray started):
packed and padded runs train the same model, and rank 0 publishes the final folder itself.
The real TorchTrainer runs are in tests/integration/test_sft_ray_train.py."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from imm_ray.storage import is_published, resolve
from imm_ray.train import SFTSettings
from imm_ray.train import loop as train_loop
from imm_ray.train.sft_data import SFTRow, pad_token_id, tokenize_rows


@pytest.fixture
def fake_ray_train(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """One rank-0 worker on this process's CPU; returns the list of reported metrics."""
    reports: list[dict] = []
    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(train_loop.ray, "get", lambda ref: ref)
    monkeypatch.setattr(train_loop.ray.train, "get_context", lambda: context)
    monkeypatch.setattr(train_loop.ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(train_loop.ray.train, "report",
                        lambda metrics, **kw: reports.append({**metrics, **kw}))
    monkeypatch.setattr(train_loop.ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(train_loop.ray.train.torch, "prepare_model", lambda model: model)
    return reports


def run_loop(tiny_model_dir: Path, out: Path, **settings) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [SFTRow(tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} plus {b}?"}],
                                                 tokenize=False, add_generation_prompt=True),
                   f"{a} plus {b} is {a + b}. " * (1 + a % 3)) for a, b in [(5, 4), (8, 3), (6, 7), (2, 9), (11, 5)]]
    examples, _ = tokenize_rows(tokenizer, rows, 512)
    train_loop.train_loop_per_worker({
        "model": resolve(tiny_model_dir), "out": resolve(out), "examples": examples,
        "pad_id": pad_token_id(tokenizer), "save_dtype": "float32",
        "fit_started": 0.0, "crash_after_step": None,
        "settings": SFTSettings(epochs=2, micro_batch_size=2, effective_batch_size=4, lr=1e-3,
                                precision="fp32", **{"checkpoint_min_interval_s": 0.0, **settings}).model_dump(),
    })
    assert is_published(out)  # with its manifest, and the tokenizer beside the weights
    assert (out / "tokenizer_config.json").is_file()
    return json.loads((out / train_loop.STATE_FILE).read_text())


def test_a_short_stage_writes_no_epoch_checkpoint_by_default(fake_ray_train, tiny_model_dir, tmp_path):
    """Epoch ends write a resume checkpoint only once checkpoint_min_interval_s (default 120 s) of
    training passed: this stage trains for a second, so only its final report is made."""
    default = SFTSettings().checkpoint_min_interval_s
    assert default == 120.0
    state = run_loop(tiny_model_dir, tmp_path / "short", checkpoint_min_interval_s=default)
    assert [r["step"] for r in state["history"]] == [1, 2, 3, 4]  # 2 epochs of 2 steps
    assert [sorted(r) for r in fake_ray_train] == [[]]


def test_packed_and_padded_runs_train_the_same_model(fake_ray_train, tiny_model_dir, tmp_path):
    packed = run_loop(tiny_model_dir, tmp_path / "packed")
    padded = run_loop(tiny_model_dir, tmp_path / "padded", packing=False)

    assert [r["step"] for r in packed["history"]] == [1, 2, 3, 4]  # 5 examples, 4 a step, 2 epochs
    for a, b in zip(packed["history"], padded["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["input_tokens"] == b["input_tokens"]
        assert a["micro_batches"] <= 4  # packed: one row per micro-batch, at most one per example of the step
    assert packed["input_tokens"] == sum(r["input_tokens"] for r in packed["history"])
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("packed", "padded")]
    for key, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][key], rtol=1e-3, atol=1e-5)
    # One resume checkpoint (after epoch 1, step 2), then the final report without a checkpoint
    # (rank 0 published the folder itself).
    assert [sorted(r) for r in fake_ray_train[:2]] == [
        ["checkpoint", "checkpoint_dir_name", "checkpoint_upload_mode",
         "delete_local_checkpoint_after_upload", "step"], []]
