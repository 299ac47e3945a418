"""`imm eval` end to end on the tiny model (hf engine, in-process): a preset and a PATH:q:a set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from imm_ray.data import DataError
from imm_ray.errors import UsageError
from imm_ray.evaluate.cli import add_eval_arguments, run_eval_cli
from imm_ray.models import ModelError
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_imm_eval_hf_engine_preset_and_mapped_file(tiny_model_dir: Path, tiny_data_dir: Path,
                                                   tmp_path: Path) -> None:
    mapped = tmp_path / "mini_mawps.jsonl"
    # SVAMP/MAWPS-style fields, numeric targets (float or string); the 2nd row is malformed.
    rows = [{"input": q, "target": float(a) if i % 2 else a} for i, (q, _, a) in enumerate(TINY_PROBLEMS[4:6])]
    rows.insert(1, {"input": "no target"})
    mapped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    args = _parse([
        "--model", str(tiny_model_dir), "--dataset", "gsm8k", "--dataset", f"{mapped}:input:target",
        "--data-dir", str(tiny_data_dir), "--engine", "hf", "--dtype", "float32", "--max-tokens", "40",
        "--instruction-suffix", "", "--limit", "3", "--samples", "2", "--temperature", "0.8",
        "--out", str(out), "--save-samples", str(samples), "--no-progress",
    ])
    assert run_eval_cli(args) == 0

    results = json.loads(out.read_text())
    assert list(results) == ["gsm8k", "mini_mawps"]
    for name, n in (("gsm8k", 3), ("mini_mawps", 2)):
        m = results[name]
        assert m["n"] == n and m["k"] == 2 and m["verifier"] == "numeric"
        assert m["accuracy"] >= 0.5  # the tiny model memorised these problems
        lo, hi = m["accuracy_ci95"]
        assert lo <= m["accuracy"] <= hi
        assert 0 <= m["maj@k"] <= m["pass@k"] <= 1 and 0 <= m["pass@1"] <= 1
        assert m["timeouts"] == 0 and m["unparseable"] >= 0
        assert set(m["diversity"]) >= {"distinct_1", "distinct_4", "self_bleu", "distinct_answers"}
        assert m["settings"]["engine"] == "hf"
    assert results["mini_mawps"]["malformed"] == 1
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == (3 + 2) * (1 + 2)  # 5 problems x (greedy + 2 samples)
    assert {r["kind"] for r in lines} == {"greedy", "sample"}


def test_imm_eval_bad_input_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = _parse(["--model", str(tiny_model_dir), "--dataset", str(tmp_path / "missing.jsonl:q:a")])
    with pytest.raises(DataError):
        run_eval_cli(args)
    args = _parse(["--model", str(tmp_path / "absent"), "--dataset", str(tmp_path / "missing.jsonl:q:a")])
    with pytest.raises(ModelError, match="does not exist"):  # the model is checked first
        run_eval_cli(args)
    args = _parse(["--model", str(tmp_path), "--dataset", "gsm8k", "--samples", "3"])
    with pytest.raises(UsageError, match="needs temperature > 0"):
        run_eval_cli(args)
