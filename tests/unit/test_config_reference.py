"""``imm config show`` and docs/config.md list every key of the config models, each with a meaning."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from imm_ray.cli import build_parser
from imm_ray.config import ImmConfig, load_config
from imm_ray.config_reference import REGENERATE, config_keys, config_markdown
from imm_ray.generate.settings import EngineSettings

REPO = Path(__file__).resolve().parents[2]


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str | None]:
    """Every dotted key of the models (list items as N, mapping values as NAME) with its description, walked
    independently."""
    keys: dict[str, str | None] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys[key] = field.description
        origin = typing.get_origin(field.annotation)
        item = {list: ".N.", dict: ".NAME."}.get(origin, ".")
        for sub in _models_in(field.annotation):
            keys.update(model_keys(sub, f"{key}{item}"))
    return keys


def test_config_show_prints_every_key_of_the_models_with_a_description():
    proc = subprocess.run([sys.executable, "-m", "imm_ray.cli", "config", "show"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    shown = {line.split()[0]: line.split("  # ", 1)[1] for line in proc.stdout.splitlines()}
    expected = model_keys(ImmConfig)
    assert set(shown) == set(expected)
    assert {"storage.endpoint_url", "generate.engine.block_size", "serve.num_replicas", "train.resources",
            "data.eval.N.limit", "serve.autoscaling.max_replicas"} <= set(shown)
    assert not [key for key, text in expected.items() if not (text or "").strip()], "fields without a docstring"
    assert all(text.strip() for text in shown.values())


def test_config_show_gives_the_resolved_values_of_a_config():
    keys = {k.key: k.value for k in config_keys(values=load_config(REPO / "jobs/configs/demo.yaml",
                                                                     ["generate.temperature=0.9"]))}
    assert keys["generate.temperature"] == "0.9"
    assert keys["run.name"] == '"demo"' and keys["generate.engine"] is None  # a section has no value
    assert {k.key: k.value for k in config_keys()}["generate.temperature"] == "0.7"  # the default


def test_docs_config_md_is_up_to_date():
    docs = REPO / "docs/config.md"
    assert docs.is_file() and docs.read_text() == config_markdown(), f"docs/config.md is stale: run {REGENERATE}"


def test_engine_flags_use_the_model_descriptions():
    parser = build_parser("eval")
    eval_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog == "imm eval")
    helps = {a.dest: a.help for a in eval_parser._actions}
    for name, field in EngineSettings.model_fields.items():
        if f"engine_{name}" in helps:
            assert helps[f"engine_{name}"].startswith(field.description.rstrip("."))


def test_run_flags_set_ray_address_and_data_dir_over_the_file_and_overrides():
    from imm_ray.cli import run_config

    demo = str(REPO / "jobs/configs/demo.yaml")
    args = build_parser("run").parse_args(["run", "--config", demo, "--ray-address", "ray://head:10001",
                                           "--data-dir", "/data", "data.dir=/elsewhere", "run.rounds=3"])
    cfg = run_config(args)
    assert (cfg.ray.address, cfg.data.dir, cfg.run.rounds) == ("ray://head:10001", "/data", 3)
    assert run_config(build_parser("run").parse_args(["run", "--config", demo])).ray.address is None
