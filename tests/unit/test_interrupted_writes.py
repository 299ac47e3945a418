"""A writer SIGKILLed between its temporary file and the rename, for each file of a run directory
written atomically: the next start (taking the run's lock) removes the temporary file and the
file keeps its previous content."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imm_ray.run import RunDir, layout
from imm_ray.storage import write_json

REPO = Path(__file__).resolve().parents[2]

# The writer: takes the run, then stops at the rename of ``TARGET`` (its temporary file written and
# synced), prints the temporary file's path and waits to be killed.
_WRITER = """
import os, sys, time
from imm_ray.run import RunDir
run_dir, target, action = sys.argv[1:]
rd = RunDir(run_dir)
rd.lock()
rename = os.replace
def replace(src, dst):
    if os.path.basename(dst) == target:
        print(src, flush=True)
        time.sleep(600)
    rename(src, dst)
os.replace = replace
exec(action)
"""

# (file, what its writer does): each atomically written file of the run's root (layout.LOCK_HOLDER_FILES
# but the lease, which exists on object storage only, where a write is one PUT with no temporary object).
_WRITES = [
    (layout.CONFIG, "rd.write_config('run: {name: new}\\n')"),
    (layout.STATE, "rd.mark_done('imm/round-001/generate', 2.0, {})"),
    (layout.STATE_BACKUP, "rd.mark_done('imm/round-001/generate', 2.0, {})"),  # state.json is already new
    (layout.METRICS, "rd.write_metrics([{'arm': 'imm', 'round': 1}])"),
    (layout.PROBE_SPLIT, "from imm_ray.storage import write_json; write_json(rd.root / 'probe_split.json', {})"),
]


def test_every_lock_holder_file_is_covered():
    assert {name for name, _ in _WRITES} == set(layout.LOCK_HOLDER_FILES) - {layout.LEASE}


def _previous_run(root: Path) -> dict[str, bytes]:
    rd = RunDir(root)
    rd.write_config("run: {name: old}\n")
    rd.mark_done("baseline/evaluate", 1.0, {})
    rd.write_metrics([{"arm": "base", "round": 0}])
    write_json(rd.root / layout.PROBE_SPLIT, {"sets": {"old": {}}})
    return {name: (root / name).read_bytes() for name, _ in _WRITES}


def _temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize(("name", "action"), _WRITES, ids=[n for n, _ in _WRITES])
def test_a_writer_killed_before_its_rename_leaves_nothing_after_the_next_start(tmp_path, name, action):
    root = tmp_path / "run"
    before = _previous_run(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), name, action], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        temp = Path(writer.stdout.readline().strip())  # blocks until the writer stops at the rename
        assert temp.parent == root and temp.is_file(), f"the writer did not stop at the rename of {name}"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert _temp_files(root) == [temp.name]
    assert (root / name).read_bytes() == before[name]

    rd = RunDir(root)
    rd.lock()
    try:
        assert _temp_files(root) == []
        assert (root / name).read_bytes() == before[name]
        assert rd.is_done("baseline/evaluate")
    finally:
        rd.unlock()


def test_the_start_clears_temporary_files_of_earlier_writers_and_keeps_other_files(tmp_path):
    """The CI failure: ``.state.json.bak.<random>.tmp`` (mkstemp's earlier naming) survived a resume."""
    root = tmp_path / "run"
    _previous_run(root)
    left = [".state.json.bak.k3j4h5ab.tmp", ".run.yaml.tmp-123-x", ".metrics.jsonl.tmp"]
    kept = [".lock", "notes.tmp", ".state.json.backup", ".eval.json.tmp-1-x"]
    for name in left + kept:
        (root / name).write_bytes(b"x")
    rd = RunDir(root)
    rd.lock()
    rd.unlock()
    names = {p.name for p in root.iterdir()}
    assert not names & set(left) and set(kept) <= names
