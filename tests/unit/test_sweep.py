"""The merge sweep without Ray: the probe split, the candidates, the selection rule, the config keys."""

import pytest

from imm_ray.config import ConfigError, load_config
from imm_ray.data.problems import Problem
from imm_ray.evaluate.probe import probe_split
from imm_ray.merge.sweep import ProbeScore, choose_candidate, frontier_choice, pareto_front, sweep_candidates
from imm_ray.run.layout import pinning_stage


def problems(n, dataset="set"):
    return [Problem(id=f"q{i}", question=f"Q{i}?", answer=str(i), dataset=dataset) for i in range(n)]


def test_the_probe_split_is_seeded_disjoint_and_independent_of_order():
    probs = problems(20)
    split = probe_split("set", probs, 0.25, seed=0)
    assert len(split.probe) == 5 and len(split.held_back) == 15
    assert {p.id for p in split.probe} | {p.id for p in split.held_back} == {p.id for p in probs}
    assert not {p.id for p in split.probe} & {p.id for p in split.held_back}
    assert [p.id for p in split.held_back] == [p.id for p in probs if p not in split.probe]  # the set's order
    again = probe_split("set", probs[::-1], 0.25, seed=0)
    assert {p.id for p in again.probe} == {p.id for p in split.probe}  # a question's side is its own
    assert {p.id for p in probe_split("set", probs, 0.25, seed=1).probe} != {p.id for p in split.probe}
    assert split.record() == {"probe": [p.id for p in split.probe], "probe_n": 5, "held_back_n": 15}


def test_a_probe_split_leaves_both_parts_non_empty():
    for fraction in (0.01, 0.99):
        assert len(probe_split("s", problems(2), fraction, 0).probe) == 1
    with pytest.raises(ValueError, match="at least 2"):
        probe_split("s", problems(1), 0.5, 0)


def test_candidates_are_the_grid_over_the_params():
    params = {"lam": 0.5, "drop_rate": 0.2}
    assert sweep_candidates(params, {"lam": [0.0, 1.0]}) == [{"lam": 0.0, "drop_rate": 0.2},
                                                            {"lam": 1.0, "drop_rate": 0.2}]
    grid = sweep_candidates(params, {"lam": [0.5, 1.0], "drop_rate": [0.1, 0.3]})
    assert [(c["lam"], c["drop_rate"]) for c in grid] == [(0.5, 0.1), (0.5, 0.3), (1.0, 0.1), (1.0, 0.3)]
    assert sweep_candidates(params, {"lam": [0.0, 1.0]}, keep=True)[-1] == params  # fixed: params scored too
    assert len(sweep_candidates(params, {"lam": [0.5, 1.0]}, keep=True)) == 2  # already a candidate


def test_the_frontier_rule_keeps_half_the_best_id_gain_then_maximises_ood():
    start = ProbeScore(id=0.40, ood=0.50)
    scores = [ProbeScore(0.40, 0.55), ProbeScore(0.46, 0.52), ProbeScore(0.50, 0.45), ProbeScore(0.60, 0.30)]
    # best gain 0.20: eligible are the candidates gaining >= 0.10 (indices 2 and 3); 2 has the better OOD
    assert frontier_choice(start, scores) == 2
    # no candidate gains: the best ID candidates compete on OOD
    losing = [ProbeScore(0.5, 0.9), ProbeScore(0.7, 0.1), ProbeScore(0.7, 0.2)]
    assert frontier_choice(ProbeScore(0.9, 0.5), losing) == 2
    # ties: the higher ID, then the earlier candidate
    assert frontier_choice(start, [ProbeScore(0.5, 0.4), ProbeScore(0.6, 0.4), ProbeScore(0.6, 0.4)]) == 1
    cands = [{"lam": 0.25}, {"lam": 0.5}, {"lam": 1.0}]
    assert choose_candidate("fixed", {"lam": 0.5}, cands, start, scores[:3]) == 1
    assert choose_candidate("frontier", {"lam": 0.5}, cands, start, scores[1:]) == 1


def test_the_pareto_front_drops_dominated_candidates():
    scores = [ProbeScore(0.4, 0.5), ProbeScore(0.5, 0.5), ProbeScore(0.6, 0.3), ProbeScore(0.5, 0.4)]
    assert pareto_front(scores) == [False, True, True, False]


def test_sweep_config_keys():
    cfg = load_config(None, ["merge.sweep=[0.0, 0.5, 1.0]", "merge.select=frontier"])
    assert cfg.merge.sweep == {"lam": [0.0, 0.5, 1.0]} and cfg.merge.select == "frontier"
    cfg = load_config(None, ["merge.sweep={lam: [0.5, 1.0], drop_rate: [0.1, 0.3]}"])
    assert cfg.merge.sweep["drop_rate"] == [0.1, 0.3] and cfg.merge.select == "fixed"
    for override, message in [
        ("merge.sweep=[0.5, 1.5, 1.5]", "distinct values"),
        ("merge.sweep={drop_rate: [0.1, 1.0]}", r"candidate .*drop_rate"),
        ("merge.select=frontier", "set merge.sweep"),
        ("merge.select=best", "merge.select"),
        ("merge.probe_fraction=1.0", "merge.probe_fraction"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="at least two sets"):
        load_config(None, ["merge.sweep=[0.5]", "data.eval=[{name: gsm8k, preset: gsm8k, split: test}]"])
    with pytest.raises(ConfigError, match="no arm of run.arms"):
        load_config(None, ["merge.sweep=[0.5]", "run.arms=[si]"])


def test_the_probe_split_pins_every_evaluation_and_the_sweep_pins_the_merge():
    done = ["baseline/evaluate", "imm/round-001/generate", "imm/round-001/sweep"]
    assert pinning_stage("merge.sweep", done) == "baseline/evaluate"
    assert pinning_stage("merge.probe_seed", done) == "baseline/evaluate"
    assert pinning_stage("merge.select", done) == "imm/round-001/sweep"
    assert pinning_stage("merge.select", done[:2]) is None
