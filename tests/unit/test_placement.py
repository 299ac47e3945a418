"""Resource requests checked against what a cluster has and can ever have (no Ray)."""

from __future__ import annotations

import pytest

from imm_ray.placement import ClusterView, NodeType, PlacementError, ResourceRequest, check_request

ONE_NODE = ClusterView(nodes=[{"CPU": 2.0, "memory": 8e9, "node:127.0.0.1": 1.0}])


def gen(count: int = 1, **res: float) -> ResourceRequest:
    return ResourceRequest("generator actor", "generate.resources", res, count)


def test_a_request_that_fits_passes():
    check_request(gen(2, CPU=1), ONE_NODE)
    check_request(gen(1, CPU=0.5, GPU=0), ONE_NODE)  # zero asks are no asks
    check_request(gen(1), ONE_NODE)


def test_a_gpu_on_a_cpu_cluster_names_the_resource_and_the_key():
    with pytest.raises(PlacementError) as err:
        check_request(gen(1, CPU=1, GPU=1), ONE_NODE)
    msg = str(err.value)
    assert "GPU: 1" in msg and "generate.resources.num_gpus" in msg and "the most is 0" in msg


def test_no_single_node_holds_the_bundle_even_if_the_sum_would():
    two = ClusterView(nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    with pytest.raises(PlacementError, match=r"CPU: 3 \(generate.resources.num_cpus\)"):
        check_request(gen(1, CPU=3), two)
    check_request(gen(2, CPU=2), two)
    with pytest.raises(PlacementError, match="room for 2"):
        check_request(gen(3, CPU=2), two)


def test_custom_resources_name_the_resources_key():
    with pytest.raises(PlacementError, match=r"node_1: 1 \(generate.resources.resources\)"):
        check_request(gen(1, CPU=1, node_1=1), ONE_NODE)


def test_autoscaler_node_types_count_as_future_capacity():
    scaling = ClusterView(nodes=[{"CPU": 2.0}], node_types=[NodeType("gpu-worker", {"CPU": 8, "GPU": 1}, 2)])
    check_request(gen(2, CPU=1, GPU=1), scaling)  # two GPU nodes may be started
    with pytest.raises(PlacementError, match="room for 2"):
        check_request(gen(3, CPU=1, GPU=1), scaling)
    with pytest.raises(PlacementError, match="autoscaler node types"):
        check_request(gen(1, GPU=2), scaling)
    unbounded = ClusterView(nodes=[], node_types=[NodeType("gpu-worker", {"CPU": 8, "GPU": 1}, -1)])
    check_request(gen(50, GPU=1), unbounded)


def test_an_sft_gpu_request_names_the_train_key_that_asks_for_it():
    sft = ResourceRequest("SFT worker", "train", {"CPU": 1, "GPU": 1}, 1,
                          key_fields={"CPU": "cpus_per_worker", "GPU": "use_gpu"})
    with pytest.raises(PlacementError, match=r"train\.use_gpu"):
        check_request(sft, ONE_NODE)
