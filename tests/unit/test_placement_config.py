"""Custom Ray resources in the config: generate, verify, merge (``*.resources.resources``) and train (per worker)."""

from __future__ import annotations

import pytest

from imm_ray.config import ConfigError, config_from_dict
from imm_ray.placement import ClusterView, PlacementError, ResourceRequest, check_request
from imm_ray.train.settings import SFTSettings


def test_stages_name_custom_resources():
    cfg = config_from_dict({
        "generate": {"resources": {"resources": {"node_1": 0.01}}},
        "train": {"resources": {"node_2": 0.01}, "cpus_per_worker": 2},
        "merge": {"resources": {"num_cpus": 1, "resources": {"node_2": 0.01}}},
    })
    assert cfg.generate.resources.resources == {"node_1": 0.01}
    assert cfg.merge.resources.resources == {"node_2": 0.01}
    assert cfg.train.worker_resources() == {"CPU": 2, "node_2": 0.01}
    assert SFTSettings(use_gpu=True).worker_resources() == {"CPU": 1, "GPU": 1}


@pytest.mark.parametrize("tree, key, words", [
    ({"train": {"resources": {"GPU": 1}}}, "train.resources", "use_gpu"),
    ({"generate": {"resources": {"resources": {"CPU": 2}}}}, "generate.resources.resources", "num_cpus"),
    ({"merge": {"resources": {"resources": {"node_2": -1}}}}, "merge.resources.resources", ">= 0"),
])
def test_bad_custom_resources_fail_at_load_naming_the_key(tree, key, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert key in str(err.value) and words in str(err.value)


def test_sft_request_the_cluster_never_holds_names_the_train_key():
    cfg = config_from_dict({"train": {"resources": {"accel": 2}}})
    request = ResourceRequest("SFT worker", "train", cfg.train.worker_resources(), cfg.train.num_workers)
    with pytest.raises(PlacementError, match=r"accel: 2 \(train\.resources\)"):
        check_request(request, ClusterView(nodes=[{"CPU": 2, "accel": 1}]))
    check_request(request, ClusterView(nodes=[{"CPU": 2, "accel": 2}]))


def test_declared_node_types_load_and_are_checked():
    cfg = config_from_dict({"ray": {"node_types": {"gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}}}})
    assert cfg.ray.node_types["gpu"].max_workers == 4 and cfg.ray.placement_timeout_s == 900
    for tree, words in [
        ({"node_types": {"gpu": {"resources": {}, "max_workers": 1}}}, "ray.node_types.gpu.resources"),
        ({"node_types": {"gpu": {"resources": {"GPU": 1}}}}, "ray.node_types.gpu.max_workers"),
        ({"node_types": {"gpu": {"resources": {"GPU": 1}, "max_workers": 1}}, "cluster_yaml": "c.yaml"},
         "not both"),
    ]:
        with pytest.raises(ConfigError, match=words):
            config_from_dict({"ray": tree})
