"""run_sft on a local Ray: real TorchTrainer fine-tunes of the tiny model (1 worker and DDP)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from imm_ray.storage import is_published, materialize, publish_dir, resolve
from imm_ray.storage.fs import list_files, upload_file
from imm_ray.train import SFTError, SFTSettings, run_sft
from imm_ray.train.loop import CRASH_ENV, STATE_FILE
from imm_ray.train.sft_data import collate, read_rows, tokenize_rows

pytestmark = pytest.mark.slow

# New problems (the tiny model memorized others), so the SFT loss has room to fall.
PAIRS = [(5, 4), (8, 3), (6, 7), (2, 9), (11, 5), (13, 4), (3, 3), (10, 10)]
SETTINGS = dict(epochs=2, micro_batch_size=2, effective_batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def sft_data(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chat-formatted prompt/completion rows, as the round driver writes them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("sft-data") / "accepted.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for a, b in PAIRS:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"What is {a} plus {b}?"}],
                tokenize=False, add_generation_prompt=True)
            completion = f"{a} plus {b} is {a + b}. The answer is {a + b}."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def completion_loss(model_dir: Path, data_path: Path) -> float:
    """Mean completion-token loss of a saved model on the SFT data (fp32, no Ray)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_rows(tokenizer, read_rows(data_path), max_length=512)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def check_checkpoint(out: Path, source: Path, data_path: Path, dtype: torch.dtype) -> None:
    """`out` is a loadable HF folder with new, still tied weights and a lower loss on the data."""
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    before = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    after = model.float().state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"
    loss_before, loss_after = completion_loss(source, data_path), completion_loss(out, data_path)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def single_worker_run(ray_local, tiny_model_dir, sft_data, tmp_path_factory):
    """One uninterrupted single-worker run (with a resume checkpoint after epoch 1)."""
    root = tmp_path_factory.mktemp("single")
    # A stale temp sibling from a killed earlier attempt: the stage removes it.
    (root / ".sft-model.tmp-deadbeef").mkdir()
    result = run_sft(tiny_model_dir, sft_data, root / "sft-model",
                     SFTSettings(**SETTINGS, checkpoint_min_interval_s=0), root / "storage")
    return root, result


def test_sft_single_worker(single_worker_run, tiny_model_dir, sft_data):
    root, result = single_worker_run
    out = root / "sft-model"
    assert result.checkpoint == str(out)
    assert is_published(out)  # with its manifest
    assert (result.examples, result.dropped) == (len(PAIRS), 0)
    assert result.steps == 4  # 8 examples / (2 x 2 accumulated) per step, 2 epochs
    assert 0 < result.final_loss < 10 and result.seconds > 0 and result.restarts == 0
    assert sorted(p.name for p in root.iterdir()) == ["sft-model", "storage"]  # no temp left
    assert list((root / "storage").iterdir()) == []  # Ray Train's run folder is removed
    check_checkpoint(out, tiny_model_dir, sft_data, torch.float32)
    state = json.loads((out / STATE_FILE).read_text())
    assert state["world_size"] == 1 and len(state["history"]) == 4
    assert [r["lr"] for r in state["history"]] == pytest.approx([1e-3, 1e-3, 7.5e-4, 2.5e-4])
    tokens = 2 * sum(len(ex.input_ids) for ex in
                     tokenize_rows(AutoTokenizer.from_pretrained(out), read_rows(sft_data), 512)[0])
    assert result.tokens == tokens == sum(r["input_tokens"] for r in state["history"])
    assert result.tokens_per_second == pytest.approx(tokens / result.seconds)
    assert set(result.timings) == {"prepare", "startup", "load", "train", "save", "finish"}
    assert sum(result.timings.values()) == pytest.approx(result.seconds, abs=0.1)


def test_sft_on_s3_resumes_from_checkpoints_kept_on_s3(
        single_worker_run, tiny_model_dir, sft_data, s3_bucket, tmp_path, monkeypatch, caplog):
    """Model, data and output on S3, Ray Train's run folder beside the output there: the worker
    materializes the model, a worker killed after step 3 of 4 resumes from step 3's checkpoint on S3
    (weights, optimizer and schedule: the same model as without the kill), rank 0 publishes. (A
    killed worker on local storage: the FSDP test below.)"""
    root = resolve(s3_bucket) / "run"
    publish_dir(tiny_model_dir, root / "original")
    upload_file(sft_data, root / "accepted.jsonl")
    monkeypatch.setenv("IMM_NODE_CACHE_DIR", str(tmp_path / "cache"))  # the driver's (it tokenizes)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")
    out = root / "sft"

    with caplog.at_level("WARNING", logger="imm_ray.train.trainer"):
        result = run_sft((root / "original").uri, root / "accepted.jsonl", out.uri,
                         SFTSettings(**SETTINGS, checkpoint_every_steps=1))

    assert marker.is_file() and result.restarts == 1 and result.steps == 4 and result.checkpoint == out.uri
    assert "recovered from 1 worker failure" in caplog.text
    assert is_published(out)
    assert sorted(list_files(root)) == sorted(  # no Ray Train folder, temp or partial file left
        [f"original/{f}" for f in list_files(root / "original")] + ["accepted.jsonl"]
        + [f"sft/{f}" for f in list_files(out)])
    plain_root, _ = single_worker_run
    local = materialize(out, cache_dir=tmp_path / "check")
    history = json.loads((local / STATE_FILE).read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert history == json.loads((plain_root / "sft-model" / STATE_FILE).read_text())["history"]
    assert (local / "model.safetensors").read_bytes() == (plain_root / "sft-model/model.safetensors").read_bytes()
    assert (local / "tokenizer.json").read_bytes() == (plain_root / "sft-model/tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def ddp_run(ray_local, tiny_model_dir, sft_data, tmp_path_factory) -> Path:
    """An uninterrupted 2-worker DDP run, saved in bfloat16."""
    out = tmp_path_factory.mktemp("ddp") / "sft-model"
    settings = SFTSettings(**SETTINGS, num_workers=2, save_dtype="bfloat16")
    assert run_sft(tiny_model_dir, sft_data, out, settings, out.parent / "storage").steps == 4
    return out


@pytest.fixture(scope="module")
def fsdp_run(ray_local, tiny_model_dir, sft_data, tmp_path_factory) -> Path:
    """An uninterrupted 2-worker FSDP run (writing sharded resume checkpoints every step)."""
    out = tmp_path_factory.mktemp("fsdp") / "sft-model"
    settings = SFTSettings(**SETTINGS, num_workers=2, strategy="fsdp", checkpoint_every_steps=1)
    assert run_sft(tiny_model_dir, sft_data, out, settings, out.parent / "storage").steps == 4
    return out


def test_sft_ddp_two_workers_bf16_save(ddp_run, tiny_model_dir, sft_data):
    check_checkpoint(ddp_run, tiny_model_dir, sft_data, torch.bfloat16)
    assert json.loads((ddp_run / STATE_FILE).read_text())["world_size"] == 2


def test_fsdp_loss_curve_matches_ddp(fsdp_run, ddp_run, tiny_model_dir, sft_data):
    """Same data order, fp32 on both (this CPU): only the order of the reductions differs, so the
    per-step losses agree to 1e-4 relative (a wrong gradient scale or a missed reduction moves
    them by percents from step 2 on)."""
    fsdp = json.loads((fsdp_run / STATE_FILE).read_text())
    ddp = json.loads((ddp_run / STATE_FILE).read_text())
    assert (fsdp["strategy"], ddp["strategy"], fsdp["bf16"], ddp["bf16"]) == ("fsdp", "ddp", False, False)
    assert [r["loss"] for r in fsdp["history"]] == pytest.approx([r["loss"] for r in ddp["history"]],
                                                                 rel=1e-4)
    assert len(fsdp["peak_rss_mb"]) == 2
    # One consolidated HF folder, with the DDP run's tensors, that loads in transformers.
    check_checkpoint(fsdp_run, tiny_model_dir, sft_data, torch.float32)
    assert load_weights(fsdp_run).keys() == load_weights(ddp_run).keys()


def test_fsdp_worker_killed_resumes_from_sharded_checkpoint(
        fsdp_run, tiny_model_dir, sft_data, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"3:{marker}")  # rank 0 exits hard after step 3 of 4, once
    out = tmp_path / "sft-model"
    settings = SFTSettings(**SETTINGS, num_workers=2, strategy="fsdp", checkpoint_every_steps=1)
    result = run_sft(tiny_model_dir, sft_data, out, settings, tmp_path / "storage")

    assert marker.is_file() and result.restarts == 1 and result.steps == 4
    assert (out / "model.safetensors").read_bytes() == (fsdp_run / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed", "sft-model", "storage"]  # no temp left


def test_worker_failure_surfaces_root_cause(ray_local, tiny_model_dir, sft_data, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "sft-model"
    with pytest.raises(SFTError, match=r"rank 0: SafetensorError"):
        run_sft(broken, sft_data, out, SFTSettings(**SETTINGS, max_failures=0),
                tmp_path / "storage")
    assert not out.exists()


def test_bad_inputs_fail_before_training(tiny_model_dir, sft_data, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(SFTError, match="already exists"):
        run_sft(tiny_model_dir, sft_data, existing, SFTSettings(), tmp_path / "storage")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SFTError, match="no examples"):
        run_sft(tiny_model_dir, empty, tmp_path / "out", SFTSettings(), tmp_path / "storage")
    with pytest.raises(SFTError, match="every prompt reaches max_length"):
        run_sft(tiny_model_dir, sft_data, tmp_path / "out", SFTSettings(max_length=4),
                tmp_path / "storage")
    assert not (tmp_path / "out").exists()
