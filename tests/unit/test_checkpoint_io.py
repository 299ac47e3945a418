"""How checkpoints move between object storage and a node (moto on loopback): what is downloaded."""

from __future__ import annotations

from pathlib import Path

from imm_ray.storage import checkpoint_checksum, folder_checksum, materialize, publish_dir, resolve
from imm_ray.storage.fs import downloaded_bytes


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 5000)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "tokenizer.json").write_text('{"t": 1}')
    return folder


def test_a_published_checksum_comes_from_its_manifest(s3_bucket, tmp_path):
    src = _checkpoint(tmp_path / "src")
    loc = publish_dir(src, resolve(s3_bucket) / "ckpt")
    before = downloaded_bytes()
    checksum = checkpoint_checksum(loc)
    assert downloaded_bytes() == before  # no file but the manifest was read
    assert checksum == folder_checksum(materialize(loc, cache_dir=tmp_path / "cache")) == checkpoint_checksum(src)
    fetched = {k: v - before.get(k, 0) for k, v in downloaded_bytes().items()}
    assert fetched == {"model.safetensors": 5000, "config.json": 8, "tokenizer.json": 8}
