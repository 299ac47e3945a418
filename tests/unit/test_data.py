"""Dataset specs, presets, loaders (local files, env/data_dir resolution, hub fallback) and prompts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from imm_ray.data import (
    DATA_DIR_ENV,
    DATASET_PRESETS,
    DataError,
    DatasetPreset,
    DatasetSpec,
    Problem,
    default_stop_strings,
    encode_prompt,
    load_problems,
    register_dataset_preset,
    render_prompt,
)
from imm_ray.data.bundled import BUNDLED_SPLITS
from imm_ray.data.prompts import ALPACA_PROMPT, DEFAULT_INSTRUCTION_SUFFIX
from imm_ray.storage import fs as storage

# The full public files (<dir>/gsm8k/train.jsonl, ...), read before the fixture below unsets it.
REAL_DATA = Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else None
needs_real_data = pytest.mark.skipif(
    REAL_DATA is None, reason=f"{DATA_DIR_ENV} unset: point it at a folder with the full benchmark files")


def _real_file(preset: str, split: str) -> Path:
    """The full public file under REAL_DATA; skips the test when that folder lacks it."""
    file = REAL_DATA / preset / f"{split}.jsonl"
    if not file.is_file():
        pytest.skip(f"{file} absent")
    return file


@pytest.fixture(autouse=True)
def _no_hub_no_env(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Never touch a model hub in tests; record hub calls; start without IMM_DATA_DIR."""
    calls: list[tuple] = []

    def refuse(hub_id: str, config: str | None, split: str) -> list[dict]:
        calls.append((hub_id, config, split))
        raise ConnectionError("hub disabled in tests")

    monkeypatch.setattr("imm_ray.data.readers.load_hub_rows", refuse)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    return calls


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _first_row(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.loads(f.readline())


# --- real benchmark files ---------------------------------------------------------------


@needs_real_data
@pytest.mark.parametrize(
    ("preset", "split", "rows"),
    [("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("svamp", "test", 1000),
     ("asdiv", "test", 2096)],
)
def test_presets_load_real_files(preset: str, split: str, rows: int) -> None:
    file = _real_file(preset, split)
    result = load_problems(DatasetSpec(name=preset, preset=preset, split=split), REAL_DATA)
    assert result.source == str(file)
    assert result.malformed == 0
    assert len(result.problems) == rows
    first = _first_row(file)
    if preset == "gsm8k":
        question, gold = first["question"], first["answer"].split("####")[-1].strip()
        gold = gold.replace(",", "")
    else:
        question, target = first["input"], float(first["target"])
        gold = str(int(target)) if target.is_integer() else str(target)
    assert result.problems[0] == Problem(
        id=f"{preset}-0", question=question.strip(), answer=gold, dataset=preset
    )
    assert len({p.id for p in result.problems}) == rows
    assert all(p.answer and p.question for p in result.problems)


def test_gsm8k_known_golds_and_offset_limit_on_the_bundled_file() -> None:
    spec = DatasetSpec(name="gsm8k", preset="gsm8k", split="train", offset=1, limit=2)
    result = load_problems(spec)
    assert [(p.id, p.answer) for p in result.problems] == [("gsm8k-1", "10"), ("gsm8k-2", "5")]


@needs_real_data
def test_env_var_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    file = _real_file("svamp", "test")
    monkeypatch.setenv(DATA_DIR_ENV, str(REAL_DATA))
    result = load_problems(DatasetSpec(name="svamp", preset="svamp"))
    assert result.source == str(file)
    assert len(result.problems) == 1000


# --- bundled copies ---------------------------------------------------------------------


@pytest.mark.parametrize("bundled", BUNDLED_SPLITS, ids=lambda b: f"{b.folder}-{b.split}")
def test_bundled_copy_serves_windows_inside_it(bundled, _no_hub_no_env: list) -> None:
    """With no data folder, the whole bundled copy (or a window of it) loads offline."""
    limit = None if bundled.rows == bundled.full_rows else bundled.rows
    result = load_problems(DatasetSpec(name="b", preset=bundled.folder, split=bundled.split, limit=limit))
    assert (result.source, len(result.problems), result.malformed) == (str(bundled.path), bundled.rows, 0)
    assert len(bundled.path.read_text(encoding="utf-8").splitlines()) == bundled.rows
    assert (bundled.path.parent / "LICENSE").is_file()
    assert _no_hub_no_env == []


@needs_real_data
@pytest.mark.parametrize("bundled", BUNDLED_SPLITS, ids=lambda b: f"{b.folder}-{b.split}")
def test_bundled_copy_is_a_prefix_of_the_real_split(bundled) -> None:
    real = _real_file(bundled.folder, bundled.split)
    real_lines = real.read_bytes().splitlines(keepends=True)
    assert len(real_lines) == bundled.full_rows
    assert bundled.path.read_bytes().rstrip(b"\n") == b"".join(real_lines[: bundled.rows]).rstrip(b"\n")
    spec = DatasetSpec(name="b", preset=bundled.folder, split=bundled.split, offset=7, limit=bundled.rows - 7)
    assert load_problems(spec).problems == load_problems(spec, REAL_DATA).problems


def test_window_beyond_the_bundled_copy_goes_to_the_hub(_no_hub_no_env: list) -> None:
    spec = DatasetSpec(name="gsm8k-train", preset="gsm8k", split="train", offset=990, limit=20)
    with pytest.raises(DataError) as info:
        load_problems(spec)
    message = str(info.value)
    assert "bundled copy holds only the first 1,000 of its 7,473 rows" in message
    assert "rows 990-1009" in message and "hub disabled in tests" in message
    assert DATA_DIR_ENV in message and "data.dir" in message
    assert _no_hub_no_env == [("openai/gsm8k", "main", "train")]


def test_data_dir_and_path_as_storage_uris(s3_bucket: str, tmp_path: Path) -> None:
    rows = [{"question": "q0", "answer": "x\n#### 5"}, {"question": "q1", "answer": "#### 6"}]
    local = _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    storage.write_bytes(storage.resolve(f"{s3_bucket}/data/gsm8k/test.jsonl"), local.read_bytes())
    spec = DatasetSpec(name="gsm8k", preset="gsm8k")
    for data_dir, source in [(f"file://{tmp_path}", str(local)),
                             (f"{s3_bucket}/data", f"{s3_bucket}/data/gsm8k/test.jsonl")]:
        result = load_problems(spec, data_dir)
        assert (result.source, [p.answer for p in result.problems]) == (source, ["5", "6"])
    by_path = DatasetSpec(name="g", path=f"{s3_bucket}/data/gsm8k", answer_format="gsm8k")
    assert [p.id for p in load_problems(by_path).problems] == ["g-0", "g-1"]
    with pytest.raises(DataError, match="typo.jsonl"):
        load_problems(DatasetSpec(name="g", path=f"{s3_bucket}/data/typo.jsonl"))


# --- resolution order ------------------------------------------------------------------


def test_resolution_order_path_then_data_dir_then_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(root: Path, gold: int) -> Path:
        row = {"question": f"q{gold}", "answer": f"work\n#### {gold}"}
        return _write_jsonl(root / "gsm8k" / "test.jsonl", [row])

    env_file, dir_file, own_file = make(tmp_path / "env", 1), make(tmp_path / "dir", 2), make(
        tmp_path / "own", 3
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    spec = DatasetSpec(name="gsm8k", preset="gsm8k")
    assert load_problems(spec).source == str(env_file)
    assert load_problems(spec, tmp_path / "dir").source == str(dir_file)
    with_path = spec.model_copy(update={"path": str(own_file)})
    result = load_problems(with_path, tmp_path / "dir")
    assert (result.source, result.problems[0].answer) == (str(own_file), "3")


def test_relative_path_and_folder_path(tmp_path: Path) -> None:
    file = _write_jsonl(tmp_path / "mawps" / "dev.jsonl", [{"question": "q", "answer": "4"}])
    relative = DatasetSpec(name="mawps", path="mawps/dev.jsonl")
    assert load_problems(relative, data_dir=tmp_path).source == str(file)
    folder = DatasetSpec(name="mawps", path=str(tmp_path / "mawps"), split="dev")
    assert load_problems(folder).source == str(file)
    by_name = DatasetSpec(name="mawps", split="dev")  # <data_dir>/<name>/<split>.jsonl
    assert load_problems(by_name, data_dir=tmp_path).source == str(file)


# --- generic loader: formats and field mapping ------------------------------------------

ROWS = [
    {"uid": "p7", "body": "What is 2+2?", "sol": "1,234"},
    {"uid": "p8", "body": "Half of 7?", "sol": 3.50},
    {"uid": "p9", "body": "Five?", "sol": 5.0},
]
MAPPED = dict(question_field="body", answer_field="sol", id_field="uid", answer_format="numeric")
EXPECTED = [
    Problem("p7", "What is 2+2?", "1234", "toy"),
    Problem("p8", "Half of 7?", "3.5", "toy"),
    Problem("p9", "Five?", "5", "toy"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json-list", "json-data", "parquet"])
def test_field_mapping_all_formats(tmp_path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "toy.jsonl", ROWS)
    elif fmt == "parquet":
        path = tmp_path / "toy.parquet"
        as_text = [{**row, "sol": str(row["sol"])} for row in ROWS]  # one Arrow type per column
        pq.write_table(pa.Table.from_pylist(as_text), path)
    else:
        path = tmp_path / "toy.json"
        path.write_text(json.dumps(ROWS if fmt == "json-list" else {"data": ROWS}))
    result = load_problems(DatasetSpec(name="toy", path=str(path), **MAPPED))
    assert result.problems == EXPECTED
    assert (result.malformed, result.source) == (0, str(path))


def test_generated_ids_and_plain_text_answers(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [{"question": "a", "answer": "\\frac{\\pi}{2}"}, {"question": "b", "answer": "7.0"}],
    )
    result = load_problems(DatasetSpec(name="math", path=str(path)))
    assert [(p.id, p.answer) for p in result.problems] == [
        ("math-0", "\\frac{\\pi}{2}"), ("math-1", "7")
    ]


def test_hub_rows_use_preset_hub_fields(_no_hub_no_env: list, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    calls: list[tuple] = []

    def fake(hub_id: str, config: str | None, split: str) -> list[dict]:
        calls.append((hub_id, config, split))
        return [{"question_concat": "Q1", "Answer": 51.0}, {"question_concat": "Q2", "Answer": 2}]

    monkeypatch.setattr("imm_ray.data.readers.load_hub_rows", fake)
    # Not bundled (the bundled SVAMP is the PAL test set): the hub copy with its own column names.
    result = load_problems(DatasetSpec(name="svamp", preset="svamp", split="train"), data_dir=tmp_path)
    assert result.source == "ChilleD/SVAMP"
    assert [(p.question, p.answer) for p in result.problems] == [("Q1", "51"), ("Q2", "2")]
    load_problems(DatasetSpec(name="gsm8k", preset="gsm8k", split="train"), data_dir=tmp_path)
    assert calls[-1] == ("openai/gsm8k", "main", "train")


# --- malformed rows ---------------------------------------------------------------------


def _malformed_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"question": "ok 1", "answer": "x\n#### 1"}),
        "{not json",
        json.dumps({"question": "no answer"}),
        "",
        json.dumps({"question": "bad gold", "answer": "no hashes here"}),
        json.dumps({"question": "ok 2", "answer": "y\n#### 2,000"}),
        json.dumps(["not", "an", "object"]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _malformed_file(tmp_path)
    spec = DatasetSpec(name="g", path=str(path), answer_format="gsm8k")
    with caplog.at_level(logging.WARNING, logger="imm_ray.data"):
        result = load_problems(spec)
    assert [(p.id, p.answer) for p in result.problems] == [("g-0", "1"), ("g-4", "2000")]
    assert result.malformed == 4
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "4 malformed" in warning and "line 2" in warning and "invalid JSON" in warning


@pytest.mark.parametrize(
    ("offset", "needle"),
    [(1, "line 2: invalid JSON"), (2, "line 3: missing answer field 'answer'"),
     (3, "line 5: unparseable gold answer")],
)
def test_strict_raises_with_location(tmp_path: Path, offset: int, needle: str) -> None:
    path = _malformed_file(tmp_path)
    spec = DatasetSpec(name="g", path=str(path), answer_format="gsm8k", strict=True, offset=offset)
    with pytest.raises(DataError) as info:
        load_problems(spec)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_numeric_format_rejects_text_gold_and_duplicate_ids(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "n.jsonl",
        [{"id": "a", "q": "x", "t": "twelve"}, {"id": "a", "q": "y", "t": 1},
         {"id": "a", "q": "z", "t": 2}, {"q": "w", "t": 3}],
    )
    spec = DatasetSpec(name="n", path=str(path), question_field="q", answer_field="t",
                       id_field="id", answer_format="numeric")
    result = load_problems(spec)
    assert [(p.id, p.answer) for p in result.problems] == [("a", "1")]
    assert result.malformed == 3


# --- offset / limit ---------------------------------------------------------------------


def test_offset_limit_slice_is_stable(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}", "answer": i} for i in range(10)])
    full = load_problems(DatasetSpec(name="s", path=str(path))).problems
    part = load_problems(DatasetSpec(name="s", path=str(path), offset=3, limit=4)).problems
    assert part == full[3:7]
    assert [p.id for p in part] == ["s-3", "s-4", "s-5", "s-6"]
    assert load_problems(DatasetSpec(name="s", path=str(path), offset=8, limit=5)).problems == full[8:]
    assert load_problems(DatasetSpec(name="s", path=str(path), limit=0)).problems == []


# --- errors -----------------------------------------------------------------------------


def test_nothing_found_raises_clear_error(tmp_path: Path, _no_hub_no_env: list) -> None:
    with pytest.raises(DataError) as info:
        load_problems(DatasetSpec(name="gsm8k", preset="gsm8k", split="train"), data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "gsm8k" / "train") in message
    assert "openai/gsm8k" in message and "hub disabled in tests" in message
    assert DATA_DIR_ENV in message and "data.dir" in message and "path" in message
    assert _no_hub_no_env == [("openai/gsm8k", "main", "train")]


def test_asdiv_is_not_bundled_and_says_where_to_put_it(tmp_path: Path, _no_hub_no_env: list) -> None:
    with pytest.raises(DataError) as info:
        load_problems(DatasetSpec(name="asdiv", preset="asdiv"), data_dir=tmp_path)
    message = str(info.value)
    assert "CC BY-NC 4.0" in message and "asdiv/test.jsonl" in message and DATA_DIR_ENV in message
    assert _no_hub_no_env == []


def test_missing_explicit_path_does_not_fall_back(tmp_path: Path, _no_hub_no_env: list) -> None:
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    spec = DatasetSpec(name="gsm8k", preset="gsm8k", path=str(tmp_path / "typo.jsonl"))
    with pytest.raises(DataError, match="typo.jsonl"):
        load_problems(spec, data_dir=tmp_path)
    assert _no_hub_no_env == []


def test_unknown_preset_and_unsupported_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset preset 'nope'"):
        load_problems(DatasetSpec(name="x", preset="nope"))
    bad = tmp_path / "data.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(DatasetSpec(name="x", path=str(bad)))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_problems(DatasetSpec(name="x", path=str(broken)))


def test_spec_validation() -> None:
    with pytest.raises(ValidationError):
        DatasetSpec(name="x", pathh="typo")
    with pytest.raises(ValidationError):
        DatasetSpec(name="x", offset=-1)
    with pytest.raises(ValidationError):
        DatasetSpec(name="x", answer_format="latex")


def test_explicit_fields_override_preset_and_register(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", [{"input": "q", "target": 3, "alt": 4}])
    spec = DatasetSpec(name="svamp", preset="svamp", path=str(path), answer_field="alt")
    assert load_problems(spec).problems[0].answer == "4"
    preset = DatasetPreset(name="toy-preset", folder="toyfolder", question_field="input",
                           answer_field="target", answer_format="numeric")
    try:
        register_dataset_preset(preset)
        with pytest.raises(ValueError, match="already exists"):
            register_dataset_preset(preset)
        _write_jsonl(tmp_path / "toyfolder" / "test.jsonl", [{"input": "q", "target": "1,5"}])
        result = load_problems(DatasetSpec(name="toy", preset="toy-preset"), tmp_path)
        assert (result.problems, result.malformed) == ([], 1)  # "1,5" is not a number
    finally:
        DATASET_PRESETS.pop("toy-preset", None)


# --- prompts ----------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(add_bos: bool, chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([ALPACA_PROMPT, "How many apples? The answer is 42."], trainer)
    if add_bos:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def test_alpaca_prompt_is_the_papers() -> None:
    text = render_prompt("How many apples?", "alpaca", tokenizer=None, system_prompt="ignored")
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHow many apples?\n\n### Response: "
        "Let's think step by step."
    )


def test_chat_prompt_uses_tokenizer_template() -> None:
    tok = _tokenizer(add_bos=False)
    text = render_prompt("How many apples?", "chat", tok)
    assert text == (
        f"<|im_start|>user\nHow many apples?{DEFAULT_INSTRUCTION_SUFFIX}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "The answer is" in DEFAULT_INSTRUCTION_SUFFIX
    bare = render_prompt("Q?", "chat", tok, system_prompt="Be brief.", instruction_suffix=None)
    assert bare == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt("Q?", "chat", _tokenizer(add_bos=False, chat_template=None))
    with pytest.raises(KeyError, match="alpaca"):
        render_prompt("Q?", "nope", tok)


def test_encode_prompt_bos_handling() -> None:
    text = render_prompt("How many apples?", "alpaca", None)
    plain, with_bos = _tokenizer(add_bos=False), _tokenizer(add_bos=True)
    ids = encode_prompt(plain, text)
    assert ids == plain(text, add_special_tokens=False)["input_ids"]
    assert ids[0] != plain.bos_token_id
    bos_ids = encode_prompt(with_bos, text)
    assert bos_ids == with_bos(text)["input_ids"]  # exactly what the tokenizer would add
    assert bos_ids[0] == with_bos.bos_token_id and bos_ids[1] != with_bos.bos_token_id
    already = encode_prompt(with_bos, "<s>" + text)  # a template that writes BOS itself
    assert already == bos_ids
    chat = render_prompt("Q?", "chat", plain)
    assert plain.decode(encode_prompt(plain, chat)) == chat


def test_default_stop_strings() -> None:
    assert default_stop_strings("alpaca") == ["### Instruction", "Question:"]
    assert default_stop_strings("chat") == []
    default_stop_strings("alpaca").append("mutated")
    assert default_stop_strings("alpaca") == ["### Instruction", "Question:"]
