"""The merge stage on a 3-node Ray cluster on loopback with its run directory on S3 (moto): the
task runs on worker node 2, materializes its inputs into that node's own cache, merges in that
node's scratch folder and publishes to S3 itself; the node's folders are then deleted (as if the
node went away) and the published checkpoint is byte-identical to the same merge run locally."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray
from checkpoint_files import checkpoint_files

from imm_ray.loop.remote import merge_remote, publish_model_remote
from imm_ray.merge import MergeOptions, merge_checkpoints
from imm_ray.ray_env import ray_binds_loopback
from imm_ray.storage import StorageOptions, checkpoint_checksum, is_published, materialize, publish_dir, resolve
from imm_ray.storage.fs import downloaded_bytes

pytestmark = pytest.mark.slow

PARAMS = {"lam": 0.5, "drop_rate": 0.2}


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Head + 2 workers (custom resources node_1, node_2), each worker with its own scratch and cache."""
    from ray.cluster_utils import Cluster

    assert ray_binds_loopback(), "ray was imported before imm_ray.ray_env.use_loopback_ray() ran"
    root = tmp_path_factory.mktemp("nodes")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_0": 1},
                                                            "include_dashboard": False})
    folders = {}
    for i in (1, 2):
        folders[i] = root / f"node_{i}"
        cluster.add_node(num_cpus=1, resources={f"node_{i}": 1},
                         env_vars={"IMM_SCRATCH_DIR": str(folders[i] / "scratch"),
                                   "IMM_NODE_CACHE_DIR": str(folders[i] / "cache")})
    ray.init(address=cluster.address)
    yield folders
    ray.shutdown()
    cluster.shutdown()



def test_merge_on_another_node_through_s3(three_nodes, s3_bucket, tiny_model_dir, scrambled_model, tmp_path):
    root = resolve(s3_bucket) / "run"
    publish_dir(tiny_model_dir, root / "original")
    publish_dir(scrambled_model, root / "imm/round-001/sft")
    out = root / "imm/round-001/merged"

    uri = merge_remote("imm", (root / "original").uri, [(root / "imm/round-001/sft").uri], out.uri, PARAMS, 0,
                       StorageOptions(), {"num_cpus": 1, "resources": {"node_2": 1}})

    assert uri == out.uri and is_published(out)
    node2 = three_nodes[2]
    assert len([p for p in (node2 / "cache").iterdir() if p.is_dir()]) == 2  # both inputs, on node 2
    assert not any((node2 / "scratch").iterdir())  # the work folder went once published
    assert not (three_nodes[1] / "cache").exists()  # node 1 was not involved
    shutil.rmtree(node2)  # the node goes away: the result lives on S3 only

    local = merge_checkpoints(str(tiny_model_dir), [str(scrambled_model)], str(tmp_path / "local"),
                              MergeOptions(method="imm", params=PARAMS, seed=0))
    assert checkpoint_files(materialize(out, cache_dir=tmp_path / "driver-cache")) == checkpoint_files(Path(local))


def test_a_model_is_copied_into_the_run_by_a_task(three_nodes, s3_bucket, tiny_model_dir):
    """The one-time copy of a start model that is not a folder on the driver's node (hub id, embedded
    model, URI: here a URI) runs in a Ray task: the driver's process downloads nothing."""
    src = publish_dir(tiny_model_dir, resolve(s3_bucket) / "models/tiny")
    before = downloaded_bytes()
    uri = publish_model_remote(src.uri, (resolve(s3_bucket) / "run/original").uri, None, StorageOptions())
    assert downloaded_bytes() == before
    assert uri.endswith("/run/original") and checkpoint_checksum(uri) == checkpoint_checksum(tiny_model_dir)
