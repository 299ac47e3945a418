"""The Ray-connect helper's pure parts: forwarded environment, address rules, token defaults.

Connecting for real (a local head, a 3-node cluster) is in tests/integration/test_cluster_local.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imm_ray import ray_env
from imm_ray.errors import UserError


def test_forwarded_env_is_one_list_without_node_local_folders():
    env = {"HF_HUB_OFFLINE": "1", "IMM_CACHE_DIR": "/c", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
           "IMM_NODE_CACHE_DIR": "/node-own", "IMM_SCRATCH_DIR": "/node-own/s", "UNRELATED": "x"}
    assert ray_env.forwarded_env(env) == {"HF_HUB_OFFLINE": "1", "IMM_CACHE_DIR": "/c",
                                          "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    # generation's and serving's former lists, in one
    for key in ("HF_HOME", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_CPU_NUM_OF_RESERVED_CPU", "IMM_CACHE_DIR"):
        assert key in ray_env.FORWARDED_ENV


def test_credentials_are_forwarded_only_on_request():
    """Keys in a runtime_env are readable with the cluster token and override the workers' roles."""
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
           "AWS_REGION": "eu-north-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}
    assert ray_env.forwarded_env(env) == {"AWS_REGION": "eu-north-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}
    assert not set(ray_env.CREDENTIAL_ENV) & set(ray_env.forwarded_env({**env, "IMM_FORWARD_CREDENTIALS": "0"}))
    opted_in = ray_env.forwarded_env({**env, "IMM_FORWARD_CREDENTIALS": "1"})
    assert opted_in == {**env, "IMM_FORWARD_CREDENTIALS": "1"}  # nested tasks forward them too


def test_actor_runtime_env(monkeypatch):
    for key in ray_env.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    assert ray_env.actor_runtime_env() == {}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert ray_env.actor_runtime_env() == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "2"}}


def test_driver_of_a_job_leaves_the_jobs_own_variables_to_the_job(monkeypatch):
    """Ray refuses a ray.init runtime_env that sets a variable the submitted job's runtime_env sets."""
    for key in ray_env.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IMM_DATA_DIR", "/data")
    job_config = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    assert ray_env._driver_runtime_env() == {"env_vars": {"IMM_DATA_DIR": "/data"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_env._driver_runtime_env() == {"env_vars": {"HF_HUB_OFFLINE": "1", "IMM_DATA_DIR": "/data"}}


def test_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.ray_address() is None
    assert ray_env.ray_address("127.0.0.1:6379") == "127.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_env.ray_address() == "10.0.0.1:6379"
    assert ray_env.ray_address("auto") == "auto"  # the explicit one wins
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match="RAY_API_SERVER_ADDRESS"):
        ray_env.ray_address()


def _loopback_env_of_fresh_process(**env: str) -> dict[str, str]:
    """What use_loopback_ray() leaves in a new process's environment (none of this one's Ray variables)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = ("import json, os; from imm_ray.ray_env import use_loopback_ray; assert use_loopback_ray(); "
            "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('RAY_')}))")
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_local_heads_keep_token_authentication_with_a_token_of_their_own():
    env = _loopback_env_of_fresh_process()
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_AUTH_MODE"] == "token"
    assert len(env["RAY_AUTH_TOKEN"]) == 64
    assert _loopback_env_of_fresh_process()["RAY_AUTH_TOKEN"] != env["RAY_AUTH_TOKEN"]


def test_a_token_or_mode_the_user_gave_is_kept():
    env = _loopback_env_of_fresh_process(RAY_AUTH_TOKEN_PATH="/tmp/t")
    assert env["RAY_AUTH_TOKEN_PATH"] == "/tmp/t" and "RAY_AUTH_TOKEN" not in env
    env = _loopback_env_of_fresh_process(RAY_AUTH_MODE="disabled")
    assert env["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in env
