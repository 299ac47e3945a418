"""The single-accelerator shape on logical resources: generator pool and SFT worker each need the one ``accel``.

``accel`` stands in for the GPU (Ray schedules a custom resource like a logical GPU, and no CPU-only
library tries CUDA for it). The driver releases the generator pool before SFT and starts it again
for the evaluation; a request for more than the cluster has fails before any stage runs.
"""

from __future__ import annotations

import logging

import pytest
import ray
from test_loop import tiny_config

from imm_ray.config import config_from_dict
from imm_ray.loop.driver import RoundDriver
from imm_ray.placement import PlacementError
from imm_ray.ray_env import ray_binds_loopback

pytestmark = pytest.mark.slow

ONE_ACCEL = {"resources": {"num_cpus": 1, "resources": {"accel": 1}}}


@pytest.fixture(scope="module")
def one_accelerator():
    """A local Ray head on loopback with 4 CPUs and one ``accel``, no autoscaler."""
    assert ray_binds_loopback(), "ray was imported before imm_ray.ray_env.use_loopback_ray() ran"
    ray.init(address="local", num_cpus=4, resources={"accel": 1}, include_dashboard=False)
    yield
    ray.shutdown()


def test_generator_and_sft_share_the_one_accelerator(one_accelerator, tiny_model_dir, tiny_data_dir, tmp_path,
                                                     caplog):
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, run={"arms": ["imm"]}, generate=ONE_ACCEL,
                                       train={"resources": {"accel": 1}}))
    with caplog.at_level(logging.INFO, logger="imm_ray"):  # the driver's INFO lines reach driver.log
        rows = RoundDriver(cfg, tmp_path / "run").run()
    assert [(r["arm"], r["round"]) for r in rows] == [("base", 0), ("imm", 1)]
    assert rows[1]["sft"]["steps"] >= 1 and set(rows[1]["accuracy"]) == {"tiny-test", "tiny-ood"}
    log = (tmp_path / "run" / "driver.log").read_text().splitlines()
    released = [line for line in log if "releasing the pool" in line]
    assert len(released) == 1 and "SFT worker (CPU: 1, accel: 1, train)" in released[0]
    assert "(it cannot be placed beside them)" in released[0]  # a fixed cluster: released only for want of room


@pytest.mark.parametrize("over, key", [
    ({"generate": {"resources": {"resources": {"accel": 2}}}}, "generate.resources.resources"),
    ({"train": {"resources": {"accel": 2}}}, "train.resources"),
])
def test_a_request_the_cluster_never_holds_fails_in_seconds(one_accelerator, tiny_model_dir, tiny_data_dir,
                                                            tmp_path, over, key):
    cfg = config_from_dict(tiny_config(tiny_model_dir, tiny_data_dir, run={"arms": ["imm"]}, **over))
    with pytest.raises(PlacementError) as err:
        RoundDriver(cfg, tmp_path / "run").run()
    # The up-front refusal ("the most is"), not the placement timeout's message.
    assert f"accel: 2 ({key})" in str(err.value) and "the most is 1" in str(err.value)
