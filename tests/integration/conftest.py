"""Fixtures of the integration tests: a local Ray head on loopback, one per test module."""

from __future__ import annotations

import pytest
import ray

from imm_ray.ray_env import ray_binds_loopback


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster (4 logical CPUs) listening on 127.0.0.1 only."""
    assert ray_binds_loopback(), "ray was imported before imm_ray.ray_env.use_loopback_ray() ran"
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
