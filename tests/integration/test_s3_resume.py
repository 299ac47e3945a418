"""Resume from S3 after a real SIGKILL in the middle of the merge upload (issue 9).

``imm run`` (the CLI, a subprocess in its own session) with its run directory on S3 (moto on
loopback) is SIGKILLed, its process group and every process it started, while the merge task's
``publish_dir`` is uploading ``merged/`` (``IMM_TEST_UPLOAD_DELAY_S`` paces the files): some files
are on S3, the manifest is not. Another driver on the run is then refused while the dead driver's
lease is live; the same command takes the lease over once it has expired, clears the half upload
instead of loading it, redoes the merge and the evaluation only, and finishes with the merged
checkpoint and the accuracies of an uninterrupted local run (the session's reference run,
tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from checkpoint_files import checkpoint_files
from processes import kill_driver_tree
from tiny_run import driver_config

from imm_ray.config import config_from_dict
from imm_ray.loop.driver import RoundDriver
from imm_ray.storage import CheckpointError, RunLockedError, is_published, materialize, read_jsonl, resolve
from imm_ray.storage.checkpoints import UPLOAD_DELAY_ENV
from imm_ray.storage.conditional import CLOCK_RESOLUTION_S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MERGE_KEY = "imm/round-001/merge"
# Renewed every 10 s: a heartbeat would have to stall 20 s to lose it. The refused driver below runs in
# this process (no start-up to outlive); the resume waits out what is left of it after the kill.
LEASE_TTL_S = 30.0
HANG_S = 900  # a driver that takes longer hangs (a bound, not a timing)


class _Bucket:
    """boto3 reads of the test bucket (what another S3 client sees while the driver writes)."""

    def __init__(self, uri: str) -> None:
        import boto3

        self.name, _, self.prefix = uri.removeprefix("s3://").partition("/")
        self.client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")

    def objects(self, folder: str) -> dict[str, datetime]:
        """``{name under folder: last modified}`` of every object under ``folder/`` of the run."""
        prefix = "/".join(p for p in (self.prefix, folder) if p) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {o["Key"][len(prefix):]: o["LastModified"] for page in pages for o in page.get("Contents", [])}

    def put_json(self, name: str, obj: dict) -> None:
        self.client.put_object(Bucket=self.name, Key=f"{self.prefix}/{name}", Body=json.dumps(obj).encode())

    def json(self, name: str) -> dict:
        try:
            return json.loads(self.client.get_object(Bucket=self.name, Key=f"{self.prefix}/{name}")["Body"].read())
        except (self.client.exceptions.NoSuchKey, ValueError):
            return {}


def _imm_run(config: Path, run_dir: str, log: Path, **env: str) -> subprocess.Popen:
    """``imm run`` in its own session (process group), its output appended to ``log``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", UPLOAD_DELAY_ENV)} | env
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "imm_ray.cli", "run", "--config", str(config),
                                 "--run-dir", run_dir], cwd=REPO, env=environ, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=HANG_S)
    assert rc == 0, f"imm run exited {rc}:\n{log.read_text()[-4000:]}"


def _kill_during_merge_upload(proc: subprocess.Popen, bucket: _Bucket, log: Path) -> dict[str, datetime]:
    """SIGKILL the driver's process group, and every process it started, once ``merged/`` has some
    files on S3 but no manifest; return what was uploaded by then."""
    deadline = time.monotonic() + HANG_S
    while True:
        assert proc.poll() is None, f"imm run exited {proc.returncode} early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the merge upload never started"
        uploaded = bucket.objects("imm/round-001/merged")
        if uploaded and bucket.json("state.json").get("stages", {}).get(MERGE_KEY, {}).get("status") == "started":
            break
        time.sleep(0.05)
    alive = kill_driver_tree(proc)
    assert not alive, f"still running: {alive}"
    assert "manifest.json" not in uploaded, "the merge upload finished before the kill landed"
    return uploaded


def test_driver_killed_during_the_merge_upload_resumes_from_s3(reference_run, s3_bucket, tiny_model_dir,
                                                               tiny_data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(driver_config(tiny_model_dir, tiny_data_dir, run={"name": "s3-resume"},
                                                   storage={"lease_ttl_s": LEASE_TTL_S})))
    log = tmp_path / "driver-out.log"
    node = {"IMM_NODE_CACHE_DIR": str(tmp_path / "cache"), "IMM_SCRATCH_DIR": str(tmp_path / "scratch")}

    uri = f"{s3_bucket}/run"
    bucket = _Bucket(uri)
    merged = resolve(uri) / "imm/round-001/merged"
    proc = _imm_run(config, uri, log, **node, **{UPLOAD_DELAY_ENV: "1.5"})
    proc_pid = proc.pid
    killed = _kill_during_merge_upload(proc, bucket, log)
    lease = bucket.json(".lease.json")
    assert lease["pid"] == proc_pid
    # At once (2/3 of the lease's time to live is left at least), the next driver is refused while
    # the dead one's lease is live (the CLI's exit 2 for this error: test_s3_two_drivers.py).
    holder = rf"in use by driver pid {proc_pid} on {re.escape(lease['host'])} .*expires in"
    with pytest.raises(RunLockedError, match=holder):
        RoundDriver(config_from_dict(yaml.safe_load(config.read_text())), uri).run()
    time.sleep(2)  # nothing of the killed run is left to finish the upload
    assert bucket.objects("imm/round-001/merged") == killed and "manifest.json" not in killed
    assert not is_published(merged)
    assert [p.name for p in (tmp_path / "scratch").iterdir() if p.name.startswith("merged.tmp-")]  # the killed task's
    with pytest.raises(CheckpointError, match="upload never finished"):
        materialize(merged, cache_dir=tmp_path / "probe-cache")

    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 2 * CLOCK_RESOLUTION_S + 0.5)  # the store's clock
    resumed_at = datetime.now(timezone.utc).replace(microsecond=0)
    _finish(_imm_run(config, uri, log, **node), log)
    assert "taking over the expired lease of driver pid" in log.read_text()

    stages = bucket.json("state.json")["stages"]
    assert all(rec["status"] == "done" for rec in stages.values()), stages
    assert stages[MERGE_KEY]["finished_at"] > resumed_at.timestamp()  # redone, not taken from the half upload
    for stage in ("generate", "verify", "sft"):  # the stages done before the kill were not
        assert stages[f"imm/round-001/{stage}"]["finished_at"] < resumed_at.timestamp(), stage
    accuracy = [r["accuracy"] for r in read_jsonl(resolve(uri) / "metrics.jsonl")]
    assert accuracy == [r["accuracy"] for r in read_jsonl(reference_run / "metrics.jsonl")]
    final = bucket.objects("imm/round-001/merged")
    manifest = bucket.json("imm/round-001/merged/manifest.json")
    assert set(final) == set(manifest["files"]) | {"manifest.json"}
    assert all(modified >= resumed_at for modified in final.values())  # every killed-run object was replaced
    assert checkpoint_files(materialize(merged)) == checkpoint_files(reference_run / "imm/round-001/merged")
    assert not bucket.json(".lease.json") and not [k for k in bucket.objects("") if ".tmp" in k]
    assert not list((tmp_path / "scratch").iterdir())  # the killed merge task's work folder was removed too
