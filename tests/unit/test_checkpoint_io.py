"""How checkpoints move between object storage and a node (moto on loopback): what is downloaded."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path

from imm_ray.storage import (
    StorageOptions,
    checkpoint_checksum,
    folder_checksum,
    fs,
    materialize,
    publish_dir,
    resolve,
    set_default_options,
)
from imm_ray.storage.fs import downloaded_bytes, read_bytes


def _checkpoint(folder: Path, weights: bytes = b"w" * 5000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
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
    # The counter is per process: files that earlier tests fetched stay in it, unchanged.
    fetched = {k: v - before.get(k, 0) for k, v in downloaded_bytes().items() if v != before.get(k, 0)}
    assert fetched == {"model.safetensors": 5000, "config.json": 8, "tokenizer.json": 8}


def _materialize_in_child(uri: str, cache: str, env: dict[str, str], bound_gb: float) -> None:
    os.environ.update(env)
    set_default_options(StorageOptions(node_cache_gb=bound_gb))
    materialize(uri, cache_dir=cache)


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")}


def test_node_cache_evicts_least_recently_used_entries_no_process_holds(s3_bucket, tmp_path, monkeypatch):
    """A bound of two checkpoints: a third evicts the least recently used one, unless a process holds it."""
    ckpts = {name: publish_dir(_checkpoint(tmp_path / name, name.encode() * 5000), resolve(s3_bucket) / name)
             for name in "abc"}
    key = {name: hashlib.sha256(read_bytes(loc / "manifest.json")).hexdigest()[:32] for name, loc in ckpts.items()}
    cache, env = tmp_path / "cache", {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    bound_gb = 2.5 * 5016 / 1e9  # room for two

    def child(name: str) -> None:  # one process per materialize: its hold ends when it exits
        proc = multiprocessing.get_context("spawn").Process(
            target=_materialize_in_child, args=(ckpts[name].uri, str(cache), env, bound_gb))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0

    child("a")
    child("b")
    child("c")
    assert _entries(cache) == {key["b"], key["c"]}  # a was the least recently used
    monkeypatch.setattr(fs, "_default_options", StorageOptions(node_cache_gb=bound_gb))
    materialize(ckpts["b"], cache_dir=cache)  # this process holds b from now on
    child("c")  # a hit: c is now more recent than b
    child("a")
    assert _entries(cache) == {key["a"], key["b"]}  # b was older, but held: c went


def test_a_large_file_downloads_in_parallel_ranges_byte_for_byte(s3_bucket, tmp_path, monkeypatch):
    payload = os.urandom((1 << 20) + 123)  # 17 parts of 64 KiB, the last one short
    loc = resolve(s3_bucket) / "big.bin"
    fs.write_bytes(loc, payload)
    reads: list[int] = []
    parts = fs._download_parts
    monkeypatch.setattr(fs, "_download_parts", lambda *a: reads.append(a[3]) or parts(*a))
    fs.download_file(loc, tmp_path / "big.bin", part_bytes=64 << 10)
    assert reads == [64 << 10] and (tmp_path / "big.bin").read_bytes() == payload
