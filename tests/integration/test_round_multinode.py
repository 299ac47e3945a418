"""One tiny-model IMM round (generate, verify, SFT, merge, evaluate, report) with its run directory
on S3 (moto) on a 3-node Ray cluster on loopback: the generator pool pinned to worker 1, SFT and
merge to worker 2, by custom resources. Each worker has its own cache and scratch folders, deleted
after every stage (as if the node had gone away), so no stage can lean on files another stage left
on a node's disk. The merged checkpoint and the round's accuracies are those of the same round on a
local path (the session's reference run, tests/integration/conftest.py: seeded, so neither the
cluster nor the baseline evaluated first changes them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import ray
from checkpoint_files import checkpoint_files
from s3_buckets import use_s3_bucket
from tiny_run import tiny_run_config

from imm_ray.config import config_from_dict
from imm_ray.loop.driver import RoundDriver
from imm_ray.ray_env import connect_ray, ray_binds_loopback
from imm_ray.storage import is_published, materialize, read_jsonl, read_text, resolve
from imm_ray.storage.checkpoints import WEIGHT_SUFFIXES
from imm_ray.storage.fs import downloaded_bytes, list_files

pytestmark = pytest.mark.slow

PINNED = {  # generators (generate and evaluate) on worker 1, SFT and merge on worker 2
    "generate": {"resources": {"resources": {"node_1": 0.01}}},
    "train": {"resources": {"node_2": 0.01}},
    "merge": {"resources": {"resources": {"node_2": 0.01}}},
}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


class NodesGoAway(RoundDriver):
    """A driver that wipes the workers' cache and scratch folders after every stage, recording
    what each node had cached and whether any scratch was left behind."""

    nodes: dict[int, Path] = {}
    seen: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, key: str, outputs: list) -> Iterator[dict[str, Any]]:
        with super().stage(key, outputs) as info:
            yield info
        record: dict[str, Any] = {"stage": key}
        for i, folder in self.nodes.items():
            record[f"cache_{i}"] = _entries(folder / "cache")
            record[f"scratch_{i}"] = _entries(folder / "scratch")
            shutil.rmtree(folder, ignore_errors=True)
        self.seen.append(record)


@pytest.fixture(scope="module")
def rounds(reference_run, s3_endpoint, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The round on S3 on one 3-node cluster (head + workers 1, 2), beside the local reference round."""
    from ray.cluster_utils import Cluster

    assert ray_binds_loopback(), "ray was imported before imm_ray.ray_env.use_loopback_ray() ran"
    root = tmp_path_factory.mktemp("multinode")
    with pytest.MonkeyPatch.context() as mp:
        bucket = use_s3_bucket(s3_endpoint, mp)
        mp.setenv("IMM_NODE_CACHE_DIR", str(root / "head/cache"))  # the driver's node
        mp.setenv("IMM_SCRATCH_DIR", str(root / "head/scratch"))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"node_0": 1}, "include_dashboard": False})
        nodes = {i: root / f"node_{i}" for i in (1, 2)}
        for i, folder in nodes.items():
            cluster.add_node(num_cpus=2, resources={f"node_{i}": 1},
                             env_vars={"IMM_SCRATCH_DIR": str(folder / "scratch"),
                                       "IMM_NODE_CACHE_DIR": str(folder / "cache")})
        try:
            connect_ray(cluster.address)  # the AWS variables (keys by the tests' opt-in) follow every task and actor
            NodesGoAway.nodes, NodesGoAway.seen = nodes, []
            uri = f"{bucket}/runs/tiny"
            cfg = config_from_dict(tiny_run_config(tiny_model_dir, tiny_data_dir, **PINNED))
            before = downloaded_bytes()
            remote = NodesGoAway(cfg, uri).run()
            fetched = {name: n - before.get(name, 0) for name, n in downloaded_bytes().items()
                       if n > before.get(name, 0)}
            yield {"local_dir": reference_run, "local": read_jsonl(reference_run / "metrics.jsonl"), "uri": uri,
                   "rows": remote, "seen": NodesGoAway.seen, "driver_downloads": fetched}
        finally:
            ray.shutdown()
            cluster.shutdown()


def test_round_on_three_nodes_and_s3_matches_the_local_round(rounds):
    root = resolve(rounds["uri"])
    assert [(r["arm"], r["round"]) for r in rounds["rows"]] == [("base", 0), ("imm", 1)]
    assert rounds["rows"][1]["sft"]["steps"] >= 1
    merged = root / "imm/round-001/merged"
    assert is_published(merged) and is_published(root / "imm/round-001/sft")
    assert checkpoint_files(materialize(merged)) == checkpoint_files(rounds["local_dir"] / "imm/round-001/merged")
    assert [r["accuracy"] for r in rounds["rows"][1:]] == [r["accuracy"] for r in rounds["local"]]
    files = set(list_files(root))
    assert {"report.md", "metrics.jsonl", "imm/round-001/eval.json", "imm/round-001/accepted.jsonl"} <= files
    assert not [f for f in files if ".tmp" in f or "ray-train" in f]  # no work or Ray Train folder left
    state = json.loads(read_text(root / "state.json"))["stages"]
    assert state["imm/round-001/sft"]["info"]["checkpoint"] == f"{rounds['uri']}/imm/round-001/sft"


def test_each_stage_ran_on_its_node_from_its_own_copy(rounds):
    """Which worker cached what, stage by stage (every worker's folders wiped after each stage):
    the generators materialized the model on worker 1, SFT and merge their inputs on worker 2,
    each again after the wipe, and no stage left scratch behind."""
    seen = {r["stage"]: r for r in rounds["seen"]}
    base = rounds["seen"][0]  # the original model's evaluation: the pool loads it on worker 1
    assert len(base["cache_1"]) == 1 and base["cache_2"] == []
    assert seen["imm/round-001/generate"]["cache_2"] == []  # the same pool generates (model in memory)
    sft, merge = seen["imm/round-001/sft"], seen["imm/round-001/merge"]
    assert sft["cache_1"] == [] and len(sft["cache_2"]) == 1  # SFT's start model, fetched by worker 2
    assert merge["cache_1"] == [] and len(merge["cache_2"]) == 2  # original + SFT output, fetched again
    evaluate = seen["imm/round-001/evaluate"]
    assert len(evaluate["cache_1"]) == 1 and evaluate["cache_2"] == []  # the merged model, on worker 1
    assert all(r["scratch_1"] == [] and r["scratch_2"] == [] for r in rounds["seen"])


def test_the_driver_downloads_no_weights(rounds, record_property):
    """The head coordinates: checksums come from manifests, the driver fetches config and tokenizer
    files only (the bytes its process copied off S3 in the round, by file name)."""
    fetched = rounds["driver_downloads"]
    record_property("driver_downloaded_bytes", sum(fetched.values()))
    assert not [name for name in fetched if name.endswith(WEIGHT_SUFFIXES)], fetched
