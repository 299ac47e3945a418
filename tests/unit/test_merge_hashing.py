"""The merge path hashes each weight file once, and every check against corruption still holds.

The merge task (its body, run here without Ray) materializes its inputs (object storage: verified
against their manifests), merges (the provenance records the inputs' and outputs' sha256) and
publishes (the manifest records every file's sha256). Inputs verified by ``materialize`` and outputs
hashed by the merge are not hashed again; a digest handed over wrongly is still caught on load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import imm_ray.merge.safetensors_io as safetensors_io
import imm_ray.storage.checkpoints as checkpoints
from imm_ray.loop.remote import merge_task
from imm_ray.merge.engine import PROVENANCE_FILE, output_sha256
from imm_ray.storage import (
    CheckpointError,
    StorageOptions,
    materialize,
    materialize_verified,
    publish_dir,
    resolve,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A run directory on a local disk or on S3, with this node's cache and scratch in ``tmp_path``."""
    monkeypatch.setenv("IMM_NODE_CACHE_DIR", str(tmp_path / "node-cache"))
    monkeypatch.setenv("IMM_SCRATCH_DIR", str(tmp_path / "scratch"))
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


@pytest.fixture
def inputs(root, tiny_model_dir, tmp_path) -> tuple[str, str]:
    """The tiny model published as the run's ``original`` and a perturbed copy as round 1's ``sft``."""
    sft = tmp_path / "sft-src"
    shutil.copytree(tiny_model_dir, sft)
    rng = np.random.default_rng(0)
    tensors = {name: (t + 0.01 * rng.standard_normal(t.shape)).astype(t.dtype)
               for name, t in load_file(sft / "model.safetensors").items()}
    save_file(tensors, sft / "model.safetensors", metadata={"format": "pt"})
    anchor, out = resolve(root) / "original", resolve(root) / "imm/round-001/sft"
    publish_dir(tiny_model_dir, anchor)
    publish_dir(sft, out)
    return anchor.uri, out.uri


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """Counts the files the storage layer and the merge engine hash, by their content's digest."""
    counts: Counter = Counter()
    for module in (checkpoints, safetensors_io):
        def counting(path, *args, _real=module.sha256_file, **kwargs):
            digest = _real(path, *args, **kwargs)
            if str(path).endswith(".safetensors"):
                counts[digest] += 1
            return digest
        monkeypatch.setattr(module, "sha256_file", counting)
    return counts


def test_merge_task_hashes_each_weight_file_once(root, inputs, hashed):
    anchor, sft = inputs
    out = f"{root}/imm/round-001/merged"
    published = merge_task._function("imm", anchor, [sft], out, {"lam": 0.5, "drop_rate": 0.2}, 0, StorageOptions())
    during = Counter(hashed)
    assert published == resolve(out).uri
    local = materialize(published)
    provenance = json.loads((local / PROVENANCE_FILE).read_text())
    manifest = json.loads((local / "manifest.json").read_text())["files"]
    digests = {
        "anchor": _sha256(materialize(anchor) / "model.safetensors"),
        "sft": _sha256(materialize(sft) / "model.safetensors"),
        "merged": _sha256(local / "model.safetensors"),
    }
    # The records are the true digests, wherever they came from.
    assert provenance["anchor"]["weight_files"] == {"model.safetensors": digests["anchor"]}
    assert provenance["models"][0]["weight_files"] == {"model.safetensors": digests["sft"]}
    assert provenance["output"]["weight_files"] == {"model.safetensors": digests["merged"]}
    assert manifest["model.safetensors"]["sha256"] == digests["merged"]
    assert all(entry["sha256"] == _sha256(local / rel) for rel, entry in manifest.items())
    # The merge task hashed each weight file once (it hashed them 2-3 times before).
    assert during == {digests["anchor"]: 1, digests["sft"]: 1, digests["merged"]: 1}


def test_materialize_verified_returns_the_manifest_digests_of_what_it_checked(root, inputs, tmp_path):
    anchor, _ = inputs
    folder, digests = materialize_verified(anchor, cache_dir=tmp_path / "cache")
    if resolve(root).is_local:
        assert digests == {}  # a local folder is not verified, so nothing is vouched for
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert digests == {p: _sha256(p) for p in files}
    assert materialize_verified(anchor, cache_dir=tmp_path / "cache") == (folder, digests)  # warm cache: the same


def test_a_wrong_known_digest_is_still_caught_on_load(s3_bucket, tiny_model_dir, tmp_path, hashed):
    dest = resolve(s3_bucket) / "ck"
    publish_dir(tiny_model_dir, dest, known_sha256={"model.safetensors": "0" * 64})
    assert not hashed  # the known digest was used, the weight file not hashed
    with pytest.raises(CheckpointError, match="do not match"):
        materialize(dest, cache_dir=tmp_path / "cache")


def test_output_sha256_reads_the_provenance(tmp_path):
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"output": {"weight_files": {"a.safetensors": "ab",
                                                                                      "b.safetensors": None}}}))
    assert output_sha256(tmp_path) == {"a.safetensors": "ab"}
    with pytest.raises(Exception, match="no readable"):
        output_sha256(tmp_path / "missing")
