"""Storage layer on a local disk and on a real S3 server (moto on loopback): atomic writes,
published checkpoints, materialize into the node cache, the run directory's state and lease."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from imm_ray.run import RunDir, RunStateError, layout
from imm_ray.storage import (
    CheckpointError,
    RunLockedError,
    StorageError,
    clear_output,
    delete,
    exists,
    is_published,
    materialize,
    publish_dir,
    read_jsonl,
    resolve,
    write_json,
    write_jsonl,
    write_text,
)
from imm_ray.storage.fs import StorageOptions, list_files, read_bytes, s3_arguments, write_bytes


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A run-directory root: a local folder or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/runs/r1"


def _checkpoint(folder: Path, payload: bytes = b"weights" * 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "tok").mkdir()
    (folder / "tok" / "vocab.txt").write_text("a\nb\n")
    return folder


def test_s3_arguments_follow_the_aws_variables_and_the_override(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    args = s3_arguments()
    assert args["access_key"] == "k" and args["secret_key"] == "s" and args["region"] == "eu-west-1"
    assert (args["endpoint_override"], args["scheme"]) == ("127.0.0.1:10", "http")
    args = s3_arguments(StorageOptions(endpoint_url="https://minio.local:9000", region="x"))
    assert (args["endpoint_override"], args["scheme"], args["region"]) == ("minio.local:9000", "https", "x")


def test_resolve_forms(tmp_path):
    assert resolve(f"file://{tmp_path}/a").uri == str(tmp_path / "a")
    assert resolve("s3://bucket/p/").uri == "s3://bucket/p"
    assert (resolve("s3://bucket/p") / "x/y").uri == "s3://bucket/p/x/y"
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        resolve("ftp://host/x")
    with pytest.raises(StorageError, match="names no bucket"):
        resolve("s3://")


def test_atomic_writes_round_trip(root):
    loc = resolve(root)
    write_jsonl(loc / "a/r.jsonl", [{"i": 1}, {"i": 2}])
    write_json(loc / "x.json", {"a": 1})
    assert read_jsonl(loc / "a/r.jsonl") == [{"i": 1}, {"i": 2}]
    assert sorted(list_files(loc)) == ["a/r.jsonl", "x.json"]  # no temp file left
    delete(loc / "a")
    assert not exists(loc / "a/r.jsonl")


def test_read_jsonl_names_the_file_and_line_of_a_bad_row(root):
    loc = resolve(root) / "r.jsonl"
    write_text(loc, '{"i": 1}\n\n{"i": 2\n')
    with pytest.raises(StorageError, match=r"r\.jsonl:3: invalid JSON"):
        read_jsonl(loc)
    write_text(loc, '{"i": 1}\n[1, 2]\n')
    with pytest.raises(StorageError, match=r"r\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(loc)


def test_local_files_get_umask_permissions(tmp_path):
    """Defect 15: files were created 0600 (temp-file defaults); they must follow the umask."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        publish_dir(_checkpoint(tmp_path / "src"), tmp_path / "ck", move=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ck" / "manifest.json").stat().st_mode) == 0o644


def test_publish_and_materialize(root, tmp_path):
    src = _checkpoint(tmp_path / "src")
    dest = resolve(root) / "imm/round-001/merged"
    publish_dir(src, dest)
    assert is_published(dest)
    assert not (src / "manifest.json").exists()  # the source (e.g. a read-only model) is not touched
    with pytest.raises(CheckpointError, match="already exists"):
        publish_dir(src, dest)
    local = materialize(dest, cache_dir=tmp_path / "cache")
    assert (local / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (local / "tok" / "vocab.txt").read_text() == "a\nb\n"
    manifest = json.loads((local / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "tok/vocab.txt"}


def test_checkpoint_without_manifest_or_with_wrong_bytes_does_not_exist(s3_bucket, tmp_path):
    src = _checkpoint(tmp_path / "src")
    dest = resolve(s3_bucket) / "ck"
    publish_dir(src, dest)
    # An interrupted upload: files without the manifest.
    delete(dest / "manifest.json")
    assert not is_published(dest)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        materialize(dest, cache_dir=tmp_path / "cache")
    # Publishing again over the leftovers (plus a stray object) gives exactly the manifest's files.
    write_bytes(dest / "stray.bin", b"left by a killed writer")
    publish_dir(src, dest)
    assert sorted(p.relative_to(m).as_posix() for m in [materialize(dest, cache_dir=tmp_path / "c2")]
                  for p in m.rglob("*") if p.is_file()) == ["config.json", "manifest.json", "model.safetensors",
                                                            "tok/vocab.txt"]
    # Bytes that do not match: another size is not listed; the same size is refused on load.
    publish_dir(src, resolve(s3_bucket) / "ck2")
    write_bytes(resolve(s3_bucket) / "ck2/config.json", b'{"a": 2, "b": 3}')
    assert not is_published(resolve(s3_bucket) / "ck2")
    publish_dir(src, resolve(s3_bucket) / "ck3")
    write_bytes(resolve(s3_bucket) / "ck3/config.json", b'{"a": 2}')
    assert is_published(resolve(s3_bucket) / "ck3")
    with pytest.raises(CheckpointError, match="do not match"):
        materialize(resolve(s3_bucket) / "ck3", cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".hold"))]


def test_cache_refills_after_corruption(s3_bucket, tmp_path):
    dest = resolve(s3_bucket) / "ck"
    publish_dir(_checkpoint(tmp_path / "src"), dest)
    first = materialize(dest, cache_dir=tmp_path / "cache")
    (first / "model.safetensors").write_bytes(b"garbage")
    (first / "tok" / "vocab.txt").unlink()
    again = materialize(dest, cache_dir=tmp_path / "cache")
    assert again == first
    assert (again / "model.safetensors").read_bytes() == b"weights" * 1000
    assert (again / "tok" / "vocab.txt").is_file()



def test_cache_hit_hashes_nothing_until_a_file_changes(s3_bucket, tmp_path, monkeypatch):
    """A warm hit trusts the stats recorded when the copy was verified; a same-size rewrite (new
    mtime) is verified again, found corrupt and fetched again."""
    from imm_ray.storage import checkpoints

    dest = resolve(s3_bucket) / "ck"
    publish_dir(_checkpoint(tmp_path / "src"), dest)
    hashed: list[str] = []
    real = checkpoints.sha256_file
    monkeypatch.setattr(checkpoints, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    first = materialize(dest, cache_dir=tmp_path / "cache")
    assert sorted(hashed) == ["config.json", "model.safetensors", "vocab.txt"]  # the fill verifies all
    hashed.clear()
    assert materialize(dest, cache_dir=tmp_path / "cache") == first
    assert hashed == []
    weights = first / "model.safetensors"
    before = weights.stat().st_mtime_ns
    weights.write_bytes(b"X" * weights.stat().st_size)
    os.utime(weights, ns=(before + 10**9, before + 10**9))
    assert materialize(dest, cache_dir=tmp_path / "cache") == first
    assert "model.safetensors" in hashed
    assert weights.read_bytes() == b"weights" * 1000
    hashed.clear()
    materialize(dest, cache_dir=tmp_path / "cache")
    assert hashed == []



def test_materialize_without_weights_fetches_config_and_tokenizer_only(s3_bucket, tmp_path):
    """A driver that only tokenizes fetches no weight file; its copy is verified and cached apart
    from the full one, and a full materialize still gets everything."""
    dest = resolve(s3_bucket) / "ck"
    publish_dir(_checkpoint(tmp_path / "src"), dest)
    meta = materialize(dest, cache_dir=tmp_path / "cache", weights=False)
    assert sorted(p.relative_to(meta).as_posix() for p in meta.rglob("*") if p.is_file()) == [
        "config.json", "manifest.json", "tok/vocab.txt"]
    assert set(json.loads((meta / "manifest.json").read_text())["files"]) == {"config.json", "tok/vocab.txt"}
    assert materialize(dest, cache_dir=tmp_path / "cache", weights=False) == meta  # warm
    full = materialize(dest, cache_dir=tmp_path / "cache")
    assert full != meta and (full / "model.safetensors").read_bytes() == b"weights" * 1000
    config = meta / "config.json"
    later = config.stat().st_mtime_ns + 10**9
    config.write_text('{"a": 3}')  # corrupt (same size, newer): verified, found wrong, fetched again
    os.utime(config, ns=(later, later))
    assert json.loads((materialize(dest, cache_dir=tmp_path / "cache", weights=False) / "config.json").read_text()) \
        == json.loads((tmp_path / "src" / "config.json").read_text())


def _materialize_in_child(uri: str, cache: str, env: dict[str, str], out: multiprocessing.Queue) -> None:
    os.environ.update(env)
    path = materialize(uri, cache_dir=cache)
    out.put((str(path), (path / "model.safetensors").stat().st_ino))


def test_two_processes_materialize_the_same_uri(s3_bucket, tmp_path):
    dest = resolve(s3_bucket) / "ck"
    publish_dir(_checkpoint(tmp_path / "src", os.urandom(3 << 20)), dest)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_materialize_in_child, args=(dest.uri, str(tmp_path / "cache"), env, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results[0] == results[1]  # one folder, filled once (same inode), both verified
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [Path(results[0][0]).name]


def test_clear_output_removes_temp_siblings(root):
    """Defect 12: a killed writer's .NAME.tmp-* folders were left forever."""
    loc = resolve(root) / "imm/round-001"
    write_bytes(loc / ".merged.tmp-abc/model.safetensors", b"x" * 10)
    write_bytes(loc / "merged/partial", b"x")
    write_bytes(loc / "sft/manifest.json", b"{}")
    clear_output(loc / "merged")
    assert sorted(list_files(loc)) == ["sft/manifest.json"]


def test_layout_keys_round_trip():
    key = layout.stage_key("imm", 3, "merge")
    assert key == "imm/round-003/merge"
    assert layout.parse_stage_key(key) == ("imm", 3, "merge")
    assert layout.parse_stage_key("baseline/evaluate") == ("base", 0, "evaluate")
    assert layout.parse_round_folder("round-012") == 12 and layout.parse_round_folder("x") is None
    with pytest.raises(ValueError):
        layout.parse_stage_key("imm/round-001/bake")


def test_run_state_persists_with_a_backup(root):
    rd = RunDir(root)
    rd.mark_started("imm/round-001/generate")
    assert not rd.is_done("imm/round-001/generate")
    rd.mark_done("imm/round-001/generate", 1.5, {"generated": 8})
    again = RunDir(root)
    assert again.is_done("imm/round-001/generate") and again.done_keys() == ["imm/round-001/generate"]
    assert again.stage("imm/round-001/generate")["info"] == {"generated": 8}
    assert again.round_dir("imm", 3).uri == resolve(root).uri + "/imm/round-003"
    assert read_bytes(again.backup_path) == read_bytes(again.state_path)


def test_corrupt_state_says_how_to_recover(root):
    """Defect 14: a corrupt state.json stopped the run with a JSON traceback and no way forward."""
    rd = RunDir(root)
    rd.mark_done("baseline/evaluate", 1.0, {})
    write_bytes(rd.state_path, b'{"stages": {"baseline/eval')
    with pytest.raises(RunStateError, match="is corrupt.*state.json.bak") as err:
        RunDir(root)
    assert "\n" not in str(err.value)


def test_run_dir_must_be_empty_or_a_run(tmp_path):
    """Defect 13: stages removed fixed names inside any folder given as the run directory."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty and holds no imm run"):
        RunDir(tmp_path).check_is_run()
    RunDir(tmp_path / "fresh").check_is_run()
    rd = RunDir(tmp_path / "run")
    rd.write_config("run: {}\n")
    (tmp_path / "run" / "extra").write_text("x")
    rd.check_is_run()


def test_inputs_are_pinned_once_a_stage_is_done(root):
    """Defect 14: a resume could silently change the original model or the data files."""
    rd = RunDir(root)
    rd.pin_inputs({"model": "aaa", "data:train": "111"})
    rd.pin_inputs({"model": "bbb", "data:train": "111"})  # nothing done yet: free to change
    rd.mark_done("baseline/evaluate", 1.0, {})
    rd.pin_inputs({"model": "bbb", "data:train": "111"})
    with pytest.raises(StorageError, match=r"inputs .* changed .*\(model\)"):
        RunDir(root).pin_inputs({"model": "ccc", "data:train": "111"})


def test_pinning_stage_names_the_first_finished_user():
    done = ["baseline/evaluate", "imm/round-001/generate", "imm/round-001/verify", "imm/round-001/sft"]
    assert layout.pinning_stage("data.eval.0.limit", done) == "baseline/evaluate"
    assert layout.pinning_stage("train.lr", done) == "imm/round-001/sft"
    assert layout.pinning_stage("merge.seed", done) is None
    assert layout.pinning_stage("model.ref", done) == "baseline/evaluate"
    assert layout.pinning_stage("verify.dedup", done) == "imm/round-001/verify"


def test_local_lock_refuses_a_second_driver(tmp_path):
    a, b = RunDir(tmp_path), RunDir(tmp_path)
    a.lock()
    with pytest.raises(RunLockedError, match="in use"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


def test_storage_failures_are_one_line_user_errors(tmp_path):
    """Defect 11's contract for this layer: the CLI prints these as one line that says what to do."""
    from imm_ray.errors import describe_error

    a = RunDir(tmp_path)
    a.lock()
    with pytest.raises(RunLockedError) as locked:
        RunDir(tmp_path).lock()
    a.unlock()
    with pytest.raises(StorageError) as scheme:
        resolve("ftp://x/y")
    for err in (locked.value, scheme.value):
        text = describe_error(err)
        assert "--debug" not in text and "\n" not in text and type(err).__name__ not in text


def test_run_lists_only_published_checkpoints(root, tmp_path):
    rd = RunDir(root)
    src = _checkpoint(tmp_path / "src")
    publish_dir(src, rd.round_dir("imm", 1) / "sft")
    publish_dir(src, rd.round_dir("imm", 1) / "merged")
    publish_dir(src, rd.round_dir("si", 2) / "sft")
    write_bytes(rd.round_dir("imm", 2) / "merged/model.safetensors", b"half")  # no manifest
    delete(rd.round_dir("si", 2) / "sft/tok/vocab.txt")  # a listed file is gone
    write_json(rd.round_dir("imm", 1) / "eval.json", {})
    rd.write_metrics([])  # a file beside the arm folders (listing it as a folder failed on a local disk)
    assert {k: v.uri for k, v in rd.checkpoints().items()} == {
        ("imm", 1, "merged"): rd.round_dir("imm", 1).uri + "/merged",
        ("imm", 1, "sft"): rd.round_dir("imm", 1).uri + "/sft"}


def test_work_dirs_of_killed_writers_are_removed_from_the_scratch_space(tmp_path, monkeypatch):
    import subprocess
    import sys

    from imm_ray.storage import work_dir_for

    monkeypatch.setenv("IMM_SCRATCH_DIR", str(tmp_path / "scratch"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / "scratch" / f"merged.tmp-{int(dead.stdout)}-x1y2"  # a SIGKILLed merge task's folder
    (killed / "merged").mkdir(parents=True)
    (killed / "merged" / "model.safetensors").write_bytes(b"half")
    other = tmp_path / "scratch" / "notes"  # not a work folder: left alone
    other.mkdir()
    mine = work_dir_for("s3://bucket/run/imm/round-001/sft")
    assert mine.name.startswith(f"sft.tmp-{os.getpid()}-") and mine.parent == tmp_path / "scratch"
    assert not killed.exists() and other.is_dir()
    again = work_dir_for("s3://bucket/run/imm/round-001/merged")  # a live writer's folder is kept
    assert mine.is_dir() and again.is_dir() and again != mine
