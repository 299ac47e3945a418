"""Every ``imm`` failure is one line on stderr naming the thing and the fix, exit status 2; the traceback
only with ``--debug``. Crafted safetensors headers are refused with such errors (real subprocesses)."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imm_ray.errors import UserError, describe_error
from imm_ray.merge import MergeError
from imm_ray.merge.safetensors_io import CheckpointReader

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "jobs/configs/demo.yaml")
W = np.arange(8, dtype=np.float32)
GOOD = {"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}


def write_checkpoint(folder: Path, header: object, data: bytes = W.tobytes(), index: object = None) -> Path:
    """A checkpoint folder whose model.safetensors has exactly this (possibly crafted) JSON header."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    (folder / "config.json").write_text("{}")
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def imm(*args: str, module: str = "imm_ray.cli", cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a failed command (exit 2, no traceback), checked to hold ``needles``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- crafted safetensors headers -------------------------------------------------------------------------

CRAFTED = {
    "entry is a list": ({"w": ["F32", [2, 4], [0, 32]]}, "header entry must be an object"),
    "header is a list": ([1, 2, 3], "must be a JSON object"),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}}, "non-negative"),
    "shape is a string": ({"w": {"dtype": "F32", "shape": "24", "data_offsets": [0, 32]}}, "shape must be"),
    "shape of booleans": ({"w": {"dtype": "F32", "shape": [True, 8], "data_offsets": [0, 32]}}, "shape must be"),
    "offsets before the data": ({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [-8, 24]}}, "data_offsets"),
    "offsets reversed": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [32, 0]}}, "begin <= end"),
    "offsets past the file": ({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [8, 40]}}, "truncated"),
    "offsets a string": ({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": "0,32"}}, "data_offsets"),
    "length does not match shape": ({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 32]}}, "needs 48"),
    "dtype is a list": ({"w": {"dtype": ["F32"], "shape": [2, 4], "data_offsets": [0, 32]}}, "unsupported dtype"),
    "tensors overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "overlap"),
}


@pytest.mark.parametrize("header, needle", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_headers_are_refused_naming_the_file(tmp_path, header, needle):
    folder = write_checkpoint(tmp_path / "ckpt", header)
    with pytest.raises(MergeError, match=needle) as err:
        CheckpointReader(folder)
    assert str(folder / "model.safetensors") in str(err.value)


def test_deeply_nested_header_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    raw = b"[" * 100_000 + b"]" * 100_000
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MergeError, match="cannot parse the safetensors header"):
        CheckpointReader(folder)


@pytest.mark.parametrize("weight_map, needle", [
    ({"w": "../outside.safetensors"}, "shard names must be files in"),
    ({"w": ["model.safetensors"]}, "weight_map must map"),
    ([1], "weight_map must map"),
])
def test_crafted_index_is_refused(tmp_path, weight_map, needle):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder = write_checkpoint(tmp_path / "ckpt", GOOD, index={"weight_map": weight_map})
    with pytest.raises(MergeError, match=needle):
        CheckpointReader(folder)


def test_a_valid_header_still_reads(tmp_path):
    with CheckpointReader(write_checkpoint(tmp_path / "ok", GOOD)) as reader:
        assert np.array_equal(reader.get("w"), W.reshape(2, 4))


# --- one-line failures of every subcommand ---------------------------------------------------------------

def test_describe_error_unwraps_remote_causes_and_names_os_errors():
    class RemoteError(Exception):  # the shape of Ray's RayTaskError: the task's exception as .cause
        cause = MergeError("anchor/model.safetensors: tensor 'w': shape must be ...")

    assert describe_error(RemoteError("Traceback...\nlots")).startswith("anchor/model.safetensors")
    err = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x")
    assert describe_error(err) == "/data/x: No such file or directory (check the path)"
    assert describe_error(UserError("line one\n  line two")) == "line one line two"
    assert describe_error(TypeError("bad")) == "TypeError: bad (rerun with --debug for the traceback)"


def test_describe_error_gives_pydantic_errors_one_line_with_their_keys():
    from pydantic import BaseModel, Field, ValidationError

    class Settings(BaseModel):
        max_model_len: int = Field(2048, ge=16)
        port: int = 8000

    with pytest.raises(ValidationError) as err:
        Settings(max_model_len=5, port="x")
    assert describe_error(err.value) == (
        "invalid Settings: max_model_len: Input should be greater than or equal to 16; "
        "port: Input should be a valid integer, unable to parse string as an integer"
    )


@pytest.mark.parametrize("args, needles", [
    (["run", "--config", "/no/such.yaml"], ["config file /no/such.yaml does not exist", "--config"]),
    (["run", "--config", DEMO, "merge.params.drop_rate=1.5"], ["merge.params", "out of range [0, 1)"]),
    (["run", "--config", DEMO, "run.roundz=3"], ["run.roundz", "did you mean run.rounds"]),
])
def test_imm_run_config_errors_are_one_line(args, needles):  # each registry name: test_config.py, in-process
    line = one_line_failure(imm(*args), *needles)
    assert line.startswith("imm run: error: ")


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    one_line_failure(imm("run", "--config", str(bad)), "not valid YAML", str(bad))


def test_jobs_entry_point_goes_through_the_same_main():
    one_line_failure(imm("--config", "/no/such.yaml", module="jobs.imm_run"), "imm run: error: config file")


def test_imm_merge_crafted_header_and_os_error_are_one_line(tmp_path):
    good = write_checkpoint(tmp_path / "good", GOOD)
    crafted = write_checkpoint(tmp_path / "crafted", CRAFTED["entry is a list"][0])
    proc = imm("merge", "--base", str(good), "--model", str(crafted), "--out", str(tmp_path / "o"), "--no-progress")
    one_line_failure(proc, "imm merge: error: ", str(crafted / "model.safetensors"), "re-save it")
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("")
    proc = imm("--log-level", "WARNING", "merge", "--base", str(good), "--model", str(good),
               "--out", str(tmp_path / "afile" / "o"), "--no-progress")
    one_line_failure(proc, str(tmp_path / "afile"), "choose another path")
    # the stand-alone module reports the same way
    proc = imm("--base", str(good), "--model", str(crafted), "--out", str(tmp_path / "o"), "--no-progress",
               module="imm_ray.merge.cli")
    one_line_failure(proc, "imm merge: error: ", "header entry must be an object")


def test_imm_serve_eval_analyze_failures_are_one_line(tmp_path):
    one_line_failure(imm("serve", "--run-dir", str(tmp_path), "not-a-key-value"), "imm serve: error: ", "key=value")
    proc = imm("eval", "--model", str(tmp_path / "absent"), "--dataset", "gsm8k", "--max-model-len", "5")
    one_line_failure(proc, "imm eval: error: invalid EngineSettings: max_model_len: ", "greater than or equal to 16")
    one_line_failure(imm("analyze", "--measures", "bogus"), "imm analyze: error: ", "bogus")


@pytest.mark.parametrize("before", [True, False])
def test_debug_shows_the_traceback(before):
    flags = ["--debug", "run"] if before else ["run", "--debug"]
    proc = imm(*flags, "--config", "/no/such.yaml")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("imm run: error: config file")


def test_merge_yaml_unknown_key_suggests_the_nearest(tmp_path):
    from imm_ray.merge.cli import load_config as load_merge_config

    cfg = tmp_path / "merge.yaml"
    cfg.write_text("methd: imm\nbase: a\nmodels: [b]\n")
    with pytest.raises(MergeError, match=r"unknown merge config key 'methd' \(did you mean 'method'\?\)"):
        load_merge_config(cfg)


# --- one CLI language: the run directory, a missing --config -----------------------------------------------

def test_imm_run_without_config_refuses_naming_the_shipped_configs():
    line = one_line_failure(imm("run"), "imm run: error: no --config given")
    for config in sorted((REPO / "jobs/configs").glob("*.yaml")):
        assert f"jobs/configs/{config.name}" in line
    # at once: before the config tree, Ray or torch is imported
    code = ("import sys; from imm_ray.cli import main; rc = main(['run']); "
            "print(rc, *(m in sys.modules for m in ('ray', 'torch', 'imm_ray.config')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.stdout.split() == ["2", "False", "False", "False"], proc.stderr


def _missing_run_args(tmp_path: Path) -> dict[str, list[str]]:
    data = tmp_path / "mini.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    missing = str(tmp_path / "no-such-run")
    return {
        "report": ["report", "--run-dir", missing],
        "analyze": ["analyze", "--run-dir", missing, "--no-ray"],
        "eval": ["eval", "--model", f"{missing}/imm/round-001/merged", "--dataset", f"{data}:question:answer",
                 "--engine", "hf"],
    }


@pytest.mark.parametrize("command", ["report", "analyze", "eval"])
def test_a_missing_run_directory_is_one_line(tmp_path, command):
    one_line_failure(imm(*_missing_run_args(tmp_path)[command]), f"imm {command}: error: ", "no-such-run")


def test_debug_adds_the_traceback_to_imm_eval(tmp_path):
    proc = imm(*_missing_run_args(tmp_path)["eval"], "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ModelError" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("imm eval: error: model folder")


def test_the_positional_run_directory_still_works_and_may_not_contradict_the_flag(tmp_path):
    one_line_failure(imm("report", str(tmp_path / "a")), "imm report: error: ", "a is not a run directory")
    one_line_failure(imm("report", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b")),
                     "imm report: error: two run directories given")


def test_every_subcommand_has_a_description_an_example_and_help_on_every_flag():
    import argparse

    from imm_ray.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {c.name for c in COMMANDS}
    for name, sub in subparsers.choices.items():
        assert sub.description and "examples:" in sub.epilog and f"imm {name} " in sub.epilog, name
        no_help = [a.dest for a in sub._actions if not a.help]
        assert not no_help, f"imm {name}: flags without help: {no_help}"
