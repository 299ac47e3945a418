"""Fixtures of the integration tests: a local Ray head on loopback, one per test module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from tiny_run import driver_config
from transformers import AutoModelForCausalLM

from imm_ray.ray_env import ray_binds_loopback


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster (4 logical CPUs) listening on 127.0.0.1 only.

    ``address="local"``: a new head even when another cluster on the machine (a ``ray start`` head, a
    stale ``/tmp/ray/ray_current_cluster``) would otherwise be joined by a plain ``ray.init()``."""
    assert ray_binds_loopback(), "ray was imported before imm_ray.ray_env.use_loopback_ray() ran"
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def scrambled_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with re-initialised weights: same shapes, forgets its answers."""
    out = tmp_path_factory.mktemp("scrambled")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """The run folder of one uninterrupted ``imm run`` of :func:`driver_config`: the checkpoints and
    stages that every killed-and-resumed driver test must end with (seeded: the run's name and its
    storage do not change them)."""
    work = tmp_path_factory.mktemp("reference-run")
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(driver_config(tiny_model_dir, tiny_data_dir, run={"name": "reference"})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "imm_ray.cli", "run", "--config", str(config),
                           "--run-dir", str(work / "run")], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"imm run exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return work / "run"
