"""gs:// run directories on a GCS-protocol server on loopback (gcp-storage-emulator, in memory):
a checkpoint published and materialized, the run's state and its lease (write, settle, read back:
pyarrow exposes no GCS preconditions)."""

from __future__ import annotations

import socket

import pytest

from imm_ray.run import RunDir, layout
from imm_ray.storage import RunLockedError, exists, materialize, publish_dir, resolve
from imm_ray.storage.checkpoints import verify_manifest


@pytest.fixture(scope="module")
def gcs_endpoint():
    """The emulator on 127.0.0.1 with bucket ``imm-gcs``; its http://127.0.0.1:PORT."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="imm-gcs")
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_a_run_directory_on_gcs(gcs_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w" * 3000)
    (src / "config.json").write_text('{"a": 1}')
    ckpt = publish_dir(src, resolve("gs://imm-gcs/run/original"))
    local = materialize(ckpt, cache_dir=tmp_path / "cache")
    assert verify_manifest(local) and (local / "model.safetensors").read_bytes() == b"w" * 3000

    a = RunDir("gs://imm-gcs/run", lease_ttl_s=30)
    a.lock()
    a.mark_done("baseline/evaluate", 1.0, {})
    with pytest.raises(RunLockedError, match="in use by driver pid"):
        RunDir("gs://imm-gcs/run", lease_ttl_s=30).lock()
    a.unlock()
    assert not exists(resolve("gs://imm-gcs/run") / layout.LEASE)
    assert RunDir("gs://imm-gcs/run").is_done("baseline/evaluate")
