"""Shared test fixtures: offline environment defaults, the tiny model and the tiny data set."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from imm_ray.generate.vllm_engine import cpu_engine_env  # noqa: E402  (imports neither torch nor vllm)
from imm_ray.ray_env import use_loopback_ray  # noqa: E402

# Before anything imports ray/huggingface_hub/transformers/vLLM (they read these at import time):
# offline, and a local Ray head on 127.0.0.1 only.
use_loopback_ray()
for _key, _value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **cpu_engine_env(1)}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from s3_buckets import use_s3_bucket  # noqa: E402

from tiny_model import TINY_PROBLEMS, build_tiny_model, write_tiny_dataset  # noqa: E402

_TINY_MODEL_SOURCE = Path(__file__).with_name("tiny_model.py")


def _tiny_model_key() -> str:
    digest = hashlib.sha256(_TINY_MODEL_SOURCE.read_bytes())
    digest.update(f"{torch.__version__} {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny memorizing chat model (read-only for tests: never write into it).

    Cached under .pytest_cache keyed by a hash of tests/tiny_model.py and the torch/transformers
    versions; built into a temporary sibling and renamed, so concurrent sessions are safe.
    """
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("imm-tiny-model") if cache is not None else tmp_path_factory.mktemp("tiny")
    target = Path(root) / _tiny_model_key()
    if (target / "config.json").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_model(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another session
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root laid out like the gsm8k preset: gsm8k/train.jsonl (all 8 tiny problems)
    and gsm8k/test.jsonl (the first 4)."""
    root = tmp_path_factory.mktemp("tiny-data")
    write_tiny_dataset(root / "gsm8k" / "train.jsonl", TINY_PROBLEMS)
    write_tiny_dataset(root / "gsm8k" / "test.jsonl", TINY_PROBLEMS[:4])
    return root


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 server on loopback (moto's server mode) for the session; its http://127.0.0.1:PORT."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback S3 server, with the AWS variables pointing at it; its s3:// URI.

    Child processes (subprocesses, Ray workers started afterwards) inherit the variables."""
    return use_s3_bucket(s3_endpoint, monkeypatch)
