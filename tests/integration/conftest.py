"""Fixtures of the integration tests: a local Ray head on loopback, one per test module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
import torch
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
