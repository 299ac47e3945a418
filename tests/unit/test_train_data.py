"""SFT data: prompt masking, eos handling, truncation, collation, JSONL reading; settings and
the lr schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from imm_ray.data.prompts import encode_prompt
from imm_ray.train import SFTError, SFTSettings
from imm_ray.train.schedule import lr_factor, warmup_steps
from imm_ray.train.sft_data import (
    IGNORE_INDEX,
    SFTRow,
    TokenizedExample,
    collate,
    pad_token_id,
    read_rows,
    tokenize_row,
    tokenize_rows,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "q1", "q2", "q3", "a1", "a2", "a3"]


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (one token per word); optionally its post-processor prepends BOS."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(adds_bos=False)


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def test_prompt_positions_masked_exactly(tokenizer):
    example = tokenize_row(tokenizer, SFTRow("q1 q2 q3", "a1 a2"), max_length=32)
    assert example is not None
    assert example.input_ids == ids("q1", "q2", "q3", "a1", "a2", "</s>")
    assert example.prompt_len == 3
    assert example.labels == [IGNORE_INDEX] * 3 + ids("a1", "a2", "</s>")


def test_prompt_tokens_match_generation_and_bos_is_masked():
    bos_tokenizer = word_tokenizer(adds_bos=True)
    example = tokenize_row(bos_tokenizer, SFTRow("q1 q2", "a1"), max_length=32)
    assert example is not None
    prompt_ids = encode_prompt(bos_tokenizer, "q1 q2")  # what the engines feed the model
    assert prompt_ids == ids("<s>", "q1", "q2")
    assert example.input_ids == prompt_ids + ids("a1", "</s>")  # no BOS before the completion
    assert example.labels == [IGNORE_INDEX] * 3 + ids("a1", "</s>")


@pytest.mark.parametrize("completion", ["a1 a2", "a1 a2</s>", "a1 a2 </s>"])
def test_eos_appended_exactly_once(tokenizer, completion):
    example = tokenize_row(tokenizer, SFTRow("q1", completion), max_length=32)
    assert example is not None
    assert example.input_ids == ids("q1", "a1", "a2", "</s>")


def test_truncation_keeps_prompt_mask(tokenizer):
    example = tokenize_row(tokenizer, SFTRow("q1 q2 q3", "a1 a2 a3"), max_length=5)
    assert example is not None
    assert example.input_ids == ids("q1", "q2", "q3", "a1", "a2")
    assert example.labels == [IGNORE_INDEX] * 3 + ids("a1", "a2")


def test_prompt_filling_max_length_is_dropped_and_counted(tokenizer):
    rows = [SFTRow("q1 q2 q3", "a1"), SFTRow("q1", "a1"), SFTRow("q1 q2 q3 q1", "a1")]
    examples, dropped = tokenize_rows(tokenizer, rows, max_length=3)
    assert dropped == 2
    assert [ex.input_ids for ex in examples] == [ids("q1", "a1", "</s>")]


def test_collate_pads_right_and_masks_padding():
    batch = [TokenizedExample([4, 5, 7, 2], 2), TokenizedExample([4, 7], 1)]
    out = collate(batch, pad_id=2)  # pad == eos, as in many chat models
    assert out["input_ids"].tolist() == [[4, 5, 7, 2], [4, 7, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 2], [-100, 7, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_pad_token_falls_back_to_eos(tokenizer):
    assert pad_token_id(tokenizer) == WORDS.index("<pad>")
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                     eos_token="</s>")
    assert pad_token_id(no_pad) == WORDS.index("</s>")


def test_tokenizer_without_eos_is_rejected(tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                     pad_token="<pad>")
    with pytest.raises(SFTError, match="eos"):
        tokenize_row(no_eos, SFTRow("q1", "a1"), max_length=8)


def test_read_rows(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "extra": 1}) + "\n\n"
                    + json.dumps({"prompt": "p2", "completion": "c2"}) + "\n")
    assert read_rows(path) == [SFTRow("p", "c"), SFTRow("p2", "c2")]
    path.write_text("")
    assert read_rows(path) == []


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: invalid JSON"),
    ('{"prompt": "p"}', "d.jsonl: row 2 needs string fields"),
    ('["p", "c"]', "d.jsonl:2: expected a JSON object"),
])
def test_read_rows_names_the_bad_line(tmp_path: Path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + line + "\n")
    with pytest.raises(SFTError, match=message):
        read_rows(path)


def test_read_rows_missing_file(tmp_path: Path):
    with pytest.raises(SFTError, match="not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_settings_preset_and_accumulation():
    settings = SFTSettings()
    assert (settings.epochs, settings.lr, settings.lr_scheduler, settings.effective_batch_size,
            settings.max_length) == (3, 2e-5, "cosine", 64, 512)
    assert settings.grad_accum_steps(world_size=1) == 16
    assert settings.grad_accum_steps(world_size=2) == 8
    assert SFTSettings(micro_batch_size=8, effective_batch_size=4).grad_accum_steps(2) == 1
    with pytest.raises(pydantic.ValidationError):
        SFTSettings(learning_rate=1e-5)


def test_warmup_steps_round_up():
    assert warmup_steps(700, 0.03) == 21
    assert warmup_steps(1, 0.03) == 1
    assert warmup_steps(10, 0.0) == 0


def test_every_step_trains_even_a_single_one():
    assert lr_factor(0, total_steps=1, warmup=1, kind="cosine") == 1.0
    assert [lr_factor(s, 4, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind, expected", [
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),  # peak after warmup, then half a cosine
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
])
def test_decay_after_warmup(kind, expected):
    factors = [lr_factor(s, total_steps=5, warmup=2, kind=kind) for s in range(5)]
    assert factors == pytest.approx(expected)
