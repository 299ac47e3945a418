"""Fault matrix, the driver line: ``imm run`` killed (SIGKILL) in a stage, then the same command again.

One uninterrupted reference run (the session's, tests/integration/conftest.py), and one run killed in
each stage after generate in turn (resumed each time): the resumed run finishes, counts every stage
once, leaves no temp file and no process of a killed driver, and its merged checkpoint is
byte-identical to the reference (the ``hf`` engine samples with the run's seed on the CPU, so
generation is deterministic on the tiny model). A kill at generate's start is not one of them: it
would take the same resume path as verify's (a stage recorded started with nothing written is
cleared and redone) with fewer processes to outlive it (no generator actor yet).

Each kill lands at the same point whatever the machine's speed: the driver to be killed stops at a
chosen point of the stage and says so in a marker file; the test kills it then. The points: right
after ``state.json`` records the stage started, or (merge) once its work is done and published but
before ``state.json`` records it, so the resume must discard the published output and redo it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from tiny_run import driver_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HANG_S = 900  # a driver that takes longer to finish or reach its stop point hangs (a bound, not a timing)
# The stages the resumed sequence kills, in run order, and where: "start" (recorded as started, no work
# done) or "end" (work done, not recorded: redone in full, so only where that is cheap).
KILL_IN = (("verify", "start"), ("sft", "start"), ("merge", "end"), ("evaluate", "start"))


# ``imm run`` (as ``python -m jobs.imm_run`` runs it) that stops at the start or the end of stage KEY
# (see KILL_IN): it writes KEY to MARKER and waits to be killed.
_HOLDING_DRIVER = """
import sys, threading
from pathlib import Path
from imm_ray.run.rundir import RunDir
from jobs.imm_run import main
key, at, marker, *argv = sys.argv[1:]
def hold():
    Path(marker).write_text(key)
    threading.Event().wait()
mark_started, mark_done = RunDir.mark_started, RunDir.mark_done
def started(self, k):
    mark_started(self, k)
    if (k, at) == (key, "start"):
        hold()
def done(self, k, seconds, info):
    if (k, at) == (key, "end"):
        hold()
    mark_done(self, k, seconds, info)
RunDir.mark_started, RunDir.mark_done = started, done
sys.exit(main(argv))
"""


def _start(config: Path, run_dir: Path, log: Path, hold: tuple[str, str, Path] | None = None) -> subprocess.Popen:
    """``imm run`` in its own session, its output appended to ``log``; ``hold``: (stage key, where, marker)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    entry = ["-c", _HOLDING_DRIVER, *map(str, hold)] if hold else ["-m", "jobs.imm_run"]
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *entry, "--config", str(config), "--run-dir", str(run_dir)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def _finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=HANG_S)
    assert rc == 0, f"imm run exited {rc}:\n{log.read_text()[-4000:]}"


def _kill_in(config: Path, run_dir: Path, key: str, at: str, log: Path) -> list[psutil.Process]:
    """Start the driver, SIGKILL it at the ``at`` point of stage ``key``; return the descendants it had then."""
    marker = log.parent / f"held-{key.replace('/', '-')}"
    proc = _start(config, run_dir, log, hold=(key, at, marker))
    deadline = time.monotonic() + HANG_S
    while not marker.exists():
        assert proc.poll() is None, (f"imm run exited {proc.returncode} before it stopped in {key}:\n"
                                     f"{log.read_text()[-4000:]}")
        assert time.monotonic() < deadline, f"the driver never stopped in {key}"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _stages(run_dir)[key]["status"] == "started"
    return children


def _alive(procs: list[psutil.Process], wait_s: float) -> list[str]:
    """The processes of ``procs`` still running after ``wait_s`` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _safetensors(folder: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    assert files, f"no safetensors in {folder}"
    return files


def test_killed_driver_resumes_to_the_same_checkpoint(reference_run, tiny_model_dir, tiny_data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(driver_config(tiny_model_dir, tiny_data_dir, run={"name": "faults"})))
    log = tmp_path / "driver-out.log"

    run_dir = tmp_path / "killed"
    orphans = {}
    for stage, at in KILL_IN:
        children = _kill_in(config, run_dir, f"imm/round-001/{stage}", at, log)
        assert children, f"the driver killed in {stage} had no child processes to check"
        orphans[stage] = children
    _finish(_start(config, run_dir, log), log)

    # The head's raylet, GCS and workers die with the driver; Ray's dashboard and runtime-env agents
    # see the raylet gone at once but exit about 60 s later (their graceful shutdown): allow 180 s,
    # three times that, for a loaded machine (the wait ends as soon as they are gone).
    deadline = time.monotonic() + 180
    for stage, children in orphans.items():
        alive = _alive(children, max(1.0, deadline - time.monotonic()))
        assert not alive, f"killed in {stage}: its processes still run: {alive}"
    stages = _stages(run_dir)
    assert all(rec["status"] == "done" for rec in stages.values()), stages
    assert set(stages) == set(_stages(reference_run))  # each stage recorded once, as in the uninterrupted run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["round"]) for r in rows] == [("imm", 1)]
    assert not [str(p) for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert _safetensors(run_dir / "imm/round-001/merged") == _safetensors(reference_run / "imm/round-001/merged")
    assert _safetensors(run_dir / "imm/round-001/sft") == _safetensors(reference_run / "imm/round-001/sft")
