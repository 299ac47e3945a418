"""Arms and the stages of a round as data: the resume logic without Ray."""

from pathlib import Path

import pytest

from imm_ray.loop.arms import arms_at_once
from imm_ray.placement import ClusterView, NodeType
from imm_ray.run import layout
from imm_ray.run.arms import ARMS, get_arm, plan_round, round_stages
from imm_ray.run.layout import ROUND_STAGES, stage_key

CUR, ORIG, RDIR = Path("/r/imm/round-001/merged"), Path("/models/orig"), Path("/r/arm/round-002")


def names(stages):
    return [s.name for s in stages]


def done_through(arm, t, stages, sft_skipped=False):
    """The done-stage mapping after ``stages`` of round ``t`` finished."""
    return {stage_key(arm, t, s): ({"skipped": sft_skipped} if s == "sft" else {}) for s in stages}


def test_the_arm_table():
    assert sorted(ARMS) == ["imm", "rest", "si"]
    assert (ARMS["imm"].sft_from, ARMS["imm"].merges, ARMS["imm"].output) == ("current", True, "merged")
    assert (ARMS["si"].sft_from, ARMS["si"].merges, ARMS["si"].output) == ("current", False, "sft")
    assert (ARMS["rest"].sft_from, ARMS["rest"].merges, ARMS["rest"].output) == ("original", False, "sft")
    with pytest.raises(KeyError, match=r"unknown arm 'nope'.*imm.*rest.*si"):
        get_arm("nope")


def test_stage_sequence_and_keys():
    assert names(ROUND_STAGES) == ["generate", "verify", "sft", "sweep", "merge", "evaluate"] == list(layout.STAGES)
    assert names(round_stages(ARMS["imm"])) == ["generate", "verify", "sft", "merge", "evaluate"]
    assert names(round_stages(ARMS["imm"], sweep=True)) == ["generate", "verify", "sft", "sweep", "merge", "evaluate"]
    assert names(round_stages(ARMS["si"], sweep=True)) == ["generate", "verify", "sft", "evaluate"]
    assert names(round_stages(ARMS["imm"], sft_skipped=True, sweep=True)) == ["generate", "verify", "sft", "evaluate"]
    assert names(round_stages(ARMS["imm"], sft_skipped=True)) == ["generate", "verify", "sft", "evaluate"]
    for arm in ("si", "rest"):
        assert names(round_stages(ARMS[arm])) == ["generate", "verify", "sft", "evaluate"]
    assert stage_key("imm", 2, "sft") == "imm/round-002/sft"  # the keys state.json already holds
    assert {s.name: s.outputs for s in ROUND_STAGES}["sft"] == ("sft",)


@pytest.mark.parametrize(
    "arm, sft_init, model",
    [("imm", CUR, RDIR / "merged"), ("si", CUR, RDIR / "sft"), ("rest", ORIG, RDIR / "sft")],
)
def test_fresh_round_runs_everything_and_the_model_follows_the_arm(arm, sft_init, model):
    plan = plan_round(arm, 2, {}, current=CUR, original=ORIG, round_output=RDIR.joinpath)
    assert names(plan.remaining) == names(round_stages(ARMS[arm]))
    assert plan.next.name == "generate"
    assert plan.sft_init == sft_init
    assert plan.model is None and plan.sft_skipped is None  # SFT decides
    finished = plan_round(arm, 2, done_through(arm, 2, names(plan.remaining)), current=CUR, original=ORIG,
                          round_output=RDIR.joinpath)
    assert finished.remaining == () and finished.next is None
    assert finished.model == model and finished.sft_skipped is False


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_skipped_sft_leaves_the_model_unchanged_and_drops_the_merge(arm):
    done = done_through(arm, 2, ["generate", "verify", "sft"], sft_skipped=True)
    plan = plan_round(arm, 2, done, current=CUR, original=ORIG, round_output=RDIR.joinpath)
    assert names(plan.remaining) == ["evaluate"]
    assert plan.model == CUR  # even for rest: the round's model is the one it started from
    assert plan.sft_skipped is True


def test_resume_after_each_stage_of_an_imm_round():
    order = ["generate", "verify", "sft", "merge", "evaluate"]
    for i in range(len(order) + 1):
        done = done_through("imm", 3, order[:i])
        # stages of other rounds and arms never count for this one
        done.update(done_through("imm", 2, order))
        done.update(done_through("si", 3, order))
        plan = plan_round("imm", 3, done, current=CUR, original=ORIG, round_output=RDIR.joinpath)
        assert names(plan.remaining) == order[i:]
        assert plan.model == (RDIR / "merged" if i >= 3 else None)


def test_a_done_merge_is_not_redone_and_a_half_done_round_only_redoes_its_tail():
    done = done_through("imm", 1, ["generate", "verify", "sft", "merge"])
    plan = plan_round(ARMS["imm"], 1, done, current=ORIG, original=ORIG, round_output=RDIR.joinpath)
    assert names(plan.remaining) == ["evaluate"] and plan.model == RDIR / "merged"


def test_a_round_with_a_sweep_merges_with_the_parameters_its_sweep_chose():
    done = done_through("imm", 1, ["generate", "verify", "sft"])
    plan = plan_round("imm", 1, done, current=ORIG, original=ORIG, round_output=RDIR.joinpath, sweep=True)
    assert names(plan.remaining) == ["sweep", "merge", "evaluate"] and plan.merge_params is None
    done[stage_key("imm", 1, "sweep")] = {"chosen": {"index": 2, "params": {"lam": 0.75, "drop_rate": 0.2}}}
    plan = plan_round("imm", 1, done, current=ORIG, original=ORIG, round_output=RDIR.joinpath, sweep=True)
    assert names(plan.remaining) == ["merge", "evaluate"] and plan.merge_params == {"lam": 0.75, "drop_rate": 0.2}


def test_plans_work_on_uris_as_well_as_paths():
    current, original = "s3://bucket/run/si/round-001/sft", "s3://bucket/run/original"
    done = done_through("rest", 2, ["generate", "verify", "sft"])
    plan = plan_round("rest", 2, done, current=current, original=original,
                      round_output=lambda name: f"s3://bucket/run/rest/round-002/{name}")
    assert plan.sft_init == original and plan.model == "s3://bucket/run/rest/round-002/sft"


def test_arms_at_once_is_sized_from_the_stages_each_arm_holds_in_turn():
    stages = {"generator pool": [{"CPU": 1.0}], "SFT": [{"CPU": 1.0, "node_2": 0.01}], "merge": [{"CPU": 2.0}]}
    # The pool is released before a stage that does not fit beside it: an arm holds one stage at a time.
    assert arms_at_once(3, 0, stages, ClusterView(nodes=[{"CPU": 6.0, "node_2": 1.0}]))[0] == 3
    width, why = arms_at_once(3, 0, stages, ClusterView(nodes=[{"CPU": 4.0, "node_2": 1.0}]))
    assert width == 2 and "2 arm(s) at once of 3" in why and "merge: CPU 2" in why
    assert arms_at_once(3, 2, stages, ClusterView(nodes=[{"CPU": 99.0, "node_2": 1.0}]))[0] == 2  # the config's cap
    assert arms_at_once(3, 1, stages, ClusterView(nodes=[{"CPU": 99.0}])) == (1, "one arm at a time "
                                                                               "(run.concurrent_arms: 1)")
    assert arms_at_once(1, 0, stages, ClusterView(nodes=[{"CPU": 99.0}]))[0] == 1
    gpu = {"generator pool": [{"CPU": 1.0, "GPU": 1.0}], "SFT": [{"CPU": 1.0, "GPU": 1.0}]}
    width, why = arms_at_once(2, 0, gpu, ClusterView(nodes=[{"CPU": 16.0, "GPU": 1.0}]))
    assert width == 1 and "GPU 1" in why  # a single GPU: the arms take turns


def test_a_cold_autoscaling_cluster_is_sized_from_its_node_types():
    stages = {"generator pool": [{"CPU": 1.0, "GPU": 1.0}], "SFT": [{"CPU": 1.0, "gpu_node": 1.0}],
              "merge": [{"CPU": 2.0}]}
    cold = ClusterView(nodes=[{"memory": 1e9}], declared_by="ray.node_types",
                       node_types=[NodeType("gpu", {"CPU": 1, "GPU": 1, "gpu_node": 1}, 2),
                                   NodeType("cpu", {"CPU": 2}, 2)])
    width, why = arms_at_once(2, 0, stages, cold)
    assert width == 2 and "gpu x2 (CPU: 1, GPU: 1, gpu_node: 1)" in why and "(ray.node_types)" in why
