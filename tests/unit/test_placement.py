"""Resource requests checked against what a cluster has and can ever have (no Ray)."""

from __future__ import annotations

import pytest

from imm_ray.placement import (
    ClusterView,
    NodeType,
    PlacementError,
    ResourceRequest,
    at_once,
    check_request,
    declared_node_types,
    packs,
    release_pools_for_sft,
)

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
    with pytest.raises(PlacementError, match=r"node types: gpu-worker x2 \(CPU: 8, GPU: 1\)"):
        check_request(gen(1, GPU=2), scaling)
    unbounded = ClusterView(nodes=[], node_types=[NodeType("gpu-worker", {"CPU": 8, "GPU": 1}, -1)])
    check_request(gen(50, GPU=1), unbounded)


def test_an_sft_gpu_request_names_the_train_key_that_asks_for_it():
    sft = ResourceRequest("SFT worker", "train", {"CPU": 1, "GPU": 1}, 1,
                          key_fields={"CPU": "cpus_per_worker", "GPU": "use_gpu"})
    with pytest.raises(PlacementError, match=r"train\.use_gpu"):
        check_request(sft, ONE_NODE)


def test_an_impossible_request_names_the_declared_types_and_their_key():
    cold = ClusterView(nodes=[{"memory": 1e9}], declared_by="ray.cluster_yaml (c.yaml)",
                       node_types=[NodeType("cpu", {"CPU": 2}, 2), NodeType("gpu", {"CPU": 1, "GPU": 1}, 1)])
    check_request(gen(1, CPU=1, GPU=1), cold)  # on a cold cluster: waits for a gpu node
    with pytest.raises(PlacementError) as err:
        check_request(gen(1, CPU=1, tpu=1), cold)
    msg = str(err.value)
    assert "tpu: 1 (generate.resources.resources)" in msg and "the most is 0" in msg
    assert "cpu x2 (CPU: 2), gpu x1 (CPU: 1, GPU: 1) (ray.cluster_yaml (c.yaml))" in msg


def test_without_declared_types_the_alive_nodes_are_all_and_the_message_says_how_to_declare():
    with pytest.raises(PlacementError, match=r"the most is 0.*ray\.node_types or ray\.cluster_yaml"):
        check_request(gen(1, CPU=1), ClusterView(nodes=[{"memory": 1e9}]))


def test_alive_nodes_of_a_type_count_among_its_max_workers():
    gpu = NodeType("gpu", {"CPU": 1, "GPU": 1, "object_store_memory": 2e8}, 2)
    booted = {"CPU": 1.0, "GPU": 1.0, "memory": 5e9, "object_store_memory": 3e8, "node:127.0.0.1": 1.0}
    cluster = ClusterView(nodes=[{"memory": 1e9}, booted, booted], node_types=[gpu])
    assert cluster.capacity() == ([{"memory": 1e9}], [(gpu, 2)])
    with pytest.raises(PlacementError, match="room for 2"):
        check_request(gen(3, GPU=1), cluster)


def test_packing_goes_node_by_node_and_stops_at_max_workers():
    cluster = ClusterView(nodes=[{"CPU": 1.0}], node_types=[NodeType("cpu", {"CPU": 2}, 1)])
    assert packs([{"CPU": 1}, {"CPU": 2}], cluster)
    assert not packs([{"CPU": 2}, {"CPU": 2}], cluster)  # 3 CPUs in all, but no node holds a second 2
    assert not packs([{"GPU": 1}], cluster)
    assert packs([{"CPU": 2}] * 5, ClusterView(node_types=[NodeType("cpu", {"CPU": 2}, -1)]))


def test_at_once_holds_any_mix_of_the_sets():
    gpu = ClusterView(node_types=[NodeType("gpu", {"CPU": 1, "GPU": 1, "gpu_node": 1}, 2),
                                  NodeType("cpu", {"CPU": 2}, 2)])
    pool, sft, merge = [{"CPU": 1, "GPU": 1}], [{"CPU": 1, "gpu_node": 1}], [{"CPU": 2}]
    assert at_once([pool, sft, merge], gpu, 4) == 2
    assert at_once([[{"CPU": 1}]], ClusterView(nodes=[{"CPU": 4.0}]), 64) == 4
    assert at_once([[{"CPU": 8}]], ClusterView(nodes=[{"CPU": 4.0}]), 64) == 1  # at least one (it waits)


CLUSTER_YAML = """
max_workers: 3
head_node_type: head
available_node_types:
  head: {resources: {CPU: 0}, max_workers: 0}
  gpu: {resources: {CPU: 8, GPU: 1}, max_workers: 4}
  cpu: {resources: {CPU: 16}}
"""


def test_node_types_come_from_the_cluster_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER_YAML)
    declared = declared_node_types({}, str(path))
    assert declared.types == (NodeType("gpu", {"CPU": 8, "GPU": 1}, 4), NodeType("cpu", {"CPU": 16}, 3))
    assert declared.declared_by == f"ray.cluster_yaml ({path})"
    assert declared_node_types({"gpu": {"resources": {"GPU": 1}, "max_workers": 2}}, None).types == (
        NodeType("gpu", {"GPU": 1}, 2),)
    assert declared_node_types({}, None).types == ()


@pytest.mark.parametrize("text, words", [
    ("available_node_types: {gpu: {max_workers: 2}}", "node type 'gpu' declares no resources"),
    ("cluster_name: x", "has no available_node_types"),
    ("a: [", "cannot be read"),
])
def test_a_cluster_yaml_without_usable_node_types_says_what_to_fix(tmp_path, text, words):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(PlacementError, match=words):
        declared_node_types({}, str(path))
    with pytest.raises(PlacementError, match="cannot be read"):
        declared_node_types({}, str(tmp_path / "missing.yaml"))


def test_autoscaler_requests_merge_the_owners_wishes_and_release_them(monkeypatch):
    import ray.autoscaler.sdk

    from imm_ray.placement import AutoscalerRequests

    sent = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: sent.append(bundles))
    AutoscalerRequests(enabled=False).want("imm", [{"GPU": 1}])  # no declared node types: no autoscaler to ask
    assert sent == []
    ahead = AutoscalerRequests(enabled=True)
    ahead.want("imm", [{"GPU": 1}, {"CPU": 2}])
    ahead.want("si", [{"GPU": 1}])
    ahead.want("imm", [{"CPU": 2}])  # replaces imm's earlier wish; si's stays
    ahead.release()
    ahead.release()  # nothing left to withdraw
    assert sent == [[{"GPU": 1}, {"CPU": 2}], [{"GPU": 1}, {"CPU": 2}, {"GPU": 1}], [{"CPU": 2}, {"GPU": 1}], []]


@pytest.mark.parametrize(("mode", "autoscales", "release"), [
    ("always", False, True), ("never", True, False),
    ("auto", True, True),  # kept through SFT, the actors' node would never idle and scale down
    ("auto", False, None),  # a fixed cluster: only when SFT cannot be placed beside them
])
def test_generator_actors_are_released_for_sft_by_mode(mode, autoscales, release):
    assert release_pools_for_sft(mode, autoscales) is release
