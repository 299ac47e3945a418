"""The layer analysis across seeds: t quantiles, the t interval over runs, the bootstrap over layers, and
``imm analyze --combine`` on two runs' analysis.json (numbers worked by hand)."""

from __future__ import annotations

import json

import pytest

from imm_ray.analysis.seeds import bootstrap_rho, combine_analyses, mean_t_interval, t_quantile_975
from imm_ray.cli import main
from imm_ray.errors import UsageError
from imm_ray.run import layout

IMPORTANCE = [0.0, 0.1, 0.3, 0.2]  # accuracy drop per layer: ranks 1 2 4 3


def _analysis(per_layer: list[float], rho: float | None) -> dict:
    """An analysis.json with one SI model whose per-layer change is ``per_layer``."""
    return {"importance": {"layers": [{"layer": i, "accuracy_drop": v, "loss_rise": None}
                                      for i, v in enumerate(IMPORTANCE)]},
            "models": [{"arm": "si", "round": 1, "kind": "sft", "change": {"per_layer": per_layer},
                        "spearman": {"accuracy_drop": rho}}]}


# change ranks 4 3 1 2: rho -1; ranks 3 4 1 2: d = -2 -2 3 1, rho = 1 - 6 * 18 / (4 * 15) = -0.8
RUN_A, RUN_B = _analysis([0.4, 0.3, 0.1, 0.2], -1.0), _analysis([0.3, 0.4, 0.1, 0.2], -0.8)


def test_t_quantiles_from_the_table_and_beyond_it():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_t_interval_hand_worked():
    # mean 0.3, sd sqrt(0.02), half 12.706 * sqrt(0.02) / sqrt(2) = 1.2706
    mean, low, high = mean_t_interval([0.2, 0.4])
    assert (mean, low, high) == pytest.approx((0.3, -0.9706, 1.5706))
    # mean -0.3, sd 0.2, half 4.303 * 0.2 / sqrt(3) = 0.49687
    assert mean_t_interval([-0.5, -0.3, -0.1]) == pytest.approx((-0.3, -0.79687, 0.19687), abs=1e-5)
    assert mean_t_interval([0.7]) == (0.7, None, None)


def test_bootstrap_over_layers():
    assert bootstrap_rho([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == (1.0, 1.0)  # every resample is monotone
    assert bootstrap_rho([1, 2], [2, 1]) == (None, None)  # too few layers
    x, y = [1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 5, 8, 7]  # rho 0.905 on all layers
    low, high = bootstrap_rho(x, y, resamples=500, seed=1)
    assert -1.0 <= low < 0.905 < high <= 1.0
    assert bootstrap_rho(x, y, resamples=500, seed=1) == (low, high)  # seeded


def test_combine_two_runs_hand_worked():
    only_a = {**RUN_A, "models": [*RUN_A["models"], {**RUN_A["models"][0], "arm": "imm", "kind": "merged",
                                                       "spearman": {"accuracy_drop": 0.5, "loss_rise": None}}]}
    rows = combine_analyses({"a": only_a, "b": RUN_B}, resamples=200)
    assert [(r.arm, r.round, r.kind, r.measure) for r in rows] == [("imm", 1, "merged", "accuracy_drop"),
                                                                  ("si", 1, "sft", "accuracy_drop")]
    imm, si = rows
    assert (imm.mean, imm.low, imm.high) == (0.5, None, None) and [r.run for r in imm.per_run] == ["a"]
    # mean -0.9, half 12.706 * sqrt(0.02) / sqrt(2) = 1.2706: [-2.17, 0.37], clipped to rho's range
    assert (si.mean, si.low, si.high) == pytest.approx((-0.9, -1.0, 0.3706))
    assert [(r.run, r.rho) for r in si.per_run] == [("a", -1.0), ("b", -0.8)]
    assert (si.per_run[0].low, si.per_run[0].high) == (-1.0, -1.0)  # a perfect ranking stays perfect


def test_imm_analyze_combine_writes_beside_the_runs_and_prints(tmp_path, capsys):
    for name, analysis in (("seed-0", RUN_A), ("seed-1", RUN_B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / layout.ANALYSIS).write_text(json.dumps(analysis))
    assert main(["analyze", "--combine", str(tmp_path / "seed-0"), str(tmp_path / "seed-1")]) == 0
    written = json.loads((tmp_path / layout.ANALYSIS_SEEDS).read_text())
    assert len(written["runs"]) == 2 and written["correlations"][0]["mean"] == pytest.approx(-0.9)
    assert "si round 1 sft accuracy_drop: mean -0.900 [-1.000, +0.371]" in capsys.readouterr().out


def test_combine_refuses_a_run_without_an_analysis_and_a_run_dir_beside_it(tmp_path, capsys):
    from imm_ray.analysis.cli import combine_runs

    (tmp_path / "seed-0").mkdir()
    with pytest.raises(UsageError, match=f"has no {layout.ANALYSIS}: run imm analyze"):
        combine_runs([str(tmp_path / "seed-0")], None)
    assert main(["analyze", "--run-dir", str(tmp_path), "--combine", str(tmp_path / "seed-0")]) == 2
    assert "give it without --run-dir" in capsys.readouterr().err
