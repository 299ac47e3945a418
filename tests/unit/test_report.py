"""Reports: report.md and PNG plots from a fabricated run directory; metric sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from imm_ray.errors import UsageError
from imm_ray.report import flatten_row, load_run_metrics, publish_rows, write_report
from imm_ray.report.cli import add_report_arguments, run_report_cli
from imm_ray.report.sinks import TensorBoardSink, make_sink
from imm_ray.storage import StorageError, read_text, resolve
from imm_ray.storage.fs import list_files, upload_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(arm: str, t: int, id_acc: float, ood_acc: float, *, ci: bool = False,
         diversity: bool = False) -> dict:
    ev = {"id-set": {"accuracy": id_acc, "n": 100, "correct": int(100 * id_acc), "unparseable": 2},
          "ood-set": {"accuracy": ood_acc, "n": 50, "correct": int(50 * ood_acc), "unparseable": 1}}
    if ci:
        for entry in ev.values():
            entry["accuracy_ci95"] = [entry["accuracy"] - 0.05, entry["accuracy"] + 0.05]
    row = {"round": t, "arm": arm, "generated": 0 if t == 0 else 64, "accepted": 0 if t == 0 else 20 + t,
           "accuracy": {k: v["accuracy"] for k, v in ev.items()}, "eval": ev, "model": f"/m/{arm}/{t}",
           "seconds": {"evaluate": 12.0} if t == 0 else
           {"generate": 30.0, "verify": 1.0, "sft": 50.0, "evaluate": 12.0, **({"merge": 4.0} if arm == "imm" else {})}}
    if diversity:
        row["diversity"] = {"questions": 16, "samples": 64, "distinct_1": 0.5 - 0.05 * t,
                            "distinct_2": 0.7, "self_bleu": 0.3 + 0.1 * t, "distinct_answers": 2.0,
                            "mean_token_entropy": None}
    return row


def _analysis() -> dict:
    def model(arm, t, kind, scale):
        return {"arm": arm, "round": t, "kind": kind, "model": f"/m/{arm}/{t}/{kind}",
                "change": {"total": 0.01 * scale, "per_layer": [0.01 * scale, 0.02 * scale, None],
                           "per_layer_module": {"attn_q": [0.01, 0.02, None], "mlp_up": [0.03, 0.01, None]}},
                "spearman": {"accuracy_drop": -0.5, "loss_rise": 0.5}}
    return {"version": 1, "original": "/m/orig",
            "importance": {"model": "/m/orig", "probe": {"dataset": "id-set", "problems": 8, "references": 6,
                                                         "references_source": "x"},
                           "baseline": {"accuracy": 0.5, "loss": 1.0},
                           "layers": [{"layer": i, "accuracy_drop": d, "loss_rise": r}
                                      for i, (d, r) in enumerate([(0.4, 2.0), (0.1, 0.3), (None, None)])]},
            "models": [model("imm", 1, "sft", 1), model("imm", 1, "merged", 0.5), model("si", 1, "sft", 1.2)]}


def _write_run(root: Path, rows: list[dict], analysis: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "run.yaml").write_text(yaml.safe_dump({
        "run": {"name": "fab", "rounds": 2, "arms": ["imm", "si"]}, "model": {"ref": "tiny"},
        "data": {"train": {"name": "id-train"}, "eval": [{"name": "id-set"}, {"name": "ood-set"}]},
        "merge": {"method": "imm", "params": {"lam": 0.5}}}))
    if analysis is not None:
        (root / "analysis.json").write_text(json.dumps(analysis))
    return root


@pytest.fixture
def full_run(tmp_path) -> Path:
    rows = [_row("base", 0, 0.30, 0.20, ci=True)]
    rows += [_row("imm", t, 0.30 + 0.05 * t, 0.20 + 0.01 * t, ci=True, diversity=t == 2) for t in (1, 2)]
    rows += [_row("si", t, 0.30 + 0.07 * t, 0.20 - 0.03 * t, ci=True, diversity=t == 2) for t in (1, 2)]
    return _write_run(tmp_path / "run", rows, _analysis())


def test_report_and_plots(full_run):
    path = write_report(full_run)
    assert path.uri == str(full_run / "report.md")
    text = read_text(path)
    assert "| arm | round | generated | accepted | ID: id-set | OOD: ood-set |" in text.splitlines()[
        next(i for i, line in enumerate(text.splitlines()) if line.startswith("| arm | round | generated"))]
    assert "40.0% [35.0, 45.0]" in text  # imm round 2 ID accuracy with its CI
    assert "distinct_1" in text and "self_bleu" in text
    assert "| si | 2 |" in text and "| base | 0 |" in text
    assert "**si** after round 2: ID 44.0% (+14.0 pt vs base), OOD 14.0% (-6.0 pt vs base)" in text
    assert "## Layer analysis" in text and "-0.50" in text
    for name in ("accuracy", "accuracy_by_dataset", "diversity", "layer_change", "module_change"):
        png = full_run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"plots/{name}.png" in text


def test_a_report_clears_what_a_killed_report_left(full_run):
    left = [full_run / ".report.md.tmp-123-ab", full_run / "plots" / ".accuracy.png.tmp-123-cd"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    write_report(full_run)
    assert not [p for p in left if p.exists()] and (full_run / "report.md").is_file()


def test_report_without_optional_parts(tmp_path):
    rows = [_row("base", 0, 0.3, 0.2), _row("imm", 1, 0.35, 0.22)]
    run = _write_run(tmp_path / "plain", rows)
    text = read_text(write_report(run))
    assert "[" not in text.split("## Results by round")[1].split("##")[0].replace("](", "")
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["accuracy.png", "accuracy_by_dataset.png"]
    assert "Layer analysis" not in text


def test_report_of_empty_run(tmp_path):
    text = read_text(write_report(tmp_path))
    assert "No finished rounds yet" in text


def test_a_corrupt_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_row("imm", 0, 0.1, 0.2)) + "\n" + '{"round": 1, "arm"\n')
    with pytest.raises(StorageError, match=r"metrics\.jsonl:2: invalid JSON"):
        load_run_metrics(tmp_path)


def test_report_on_object_storage(full_run, s3_bucket):
    root = resolve(s3_bucket) / "runs/fab"
    for name in ("metrics.jsonl", "run.yaml", "analysis.json"):
        upload_file(full_run / name, root / name)
    path = write_report(root.uri)
    assert path.uri == f"{s3_bucket}/runs/fab/report.md"
    assert "**si** after round 2" in read_text(path)
    assert {"plots/accuracy.png", "plots/layer_change.png", "report.md"} <= set(list_files(root))


def test_report_cli_with_a_tensorboard_sink_on_object_storage(full_run, s3_bucket):
    from imm_ray.cli import main
    from imm_ray.storage.fs import read_bytes

    root = resolve(s3_bucket) / "runs/fab"
    for name in ("metrics.jsonl", "run.yaml"):
        upload_file(full_run / name, root / name)
    upload_file(full_run / "metrics.jsonl", root / "tensorboard/gone/events.out.tfevents.0")  # a former report's
    assert main(["report", root.uri, "--sink", "tensorboard"]) == 0
    files = set(list_files(root))
    assert "report.md" in files and "plots/accuracy.png" in files
    events = sorted(f for f in files if f.startswith("tensorboard/"))
    assert [f.split("/")[1] for f in events] == ["imm", "si"], events  # one event file per arm; the old one gone
    assert all(b"accuracy/id-set" in read_bytes(root / f) for f in events)


def test_run_metrics_names(full_run):
    run = load_run_metrics(full_run)
    assert run.datasets == ["id-set", "ood-set"] and run.id_dataset == "id-set"
    assert run.arms == ["imm", "si"]
    assert run.stages == ["generate", "verify", "sft", "merge", "evaluate"]
    assert run.diversity_keys == ["distinct_1", "distinct_2", "self_bleu", "distinct_answers"]
    assert [r["round"] for r in run.arm_rows("si")] == [0, 1, 2]


def test_flatten_row_and_tensorboard_sink(full_run):
    row = load_run_metrics(full_run).rows[-1]
    flat = flatten_row(row)
    assert flat["accuracy/id-set"] == pytest.approx(0.44)
    assert flat["accuracy_ci95_high/ood-set"] == pytest.approx(0.19)
    assert flat["diversity/self_bleu"] == pytest.approx(0.5)
    assert flat["seconds/sft"] == 50.0 and "diversity/mean_token_entropy" not in flat
    sink = make_sink("tensorboard", full_run)
    assert isinstance(sink, TensorBoardSink)
    assert publish_rows(load_run_metrics(full_run).rows, [sink]) == 5
    for arm in ("imm", "si"):
        assert list((full_run / "tensorboard" / arm).glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="unknown metrics sink"):
        make_sink("wandb", full_run)


def test_report_cli(full_run, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    assert run_report_cli(parser.parse_args([str(full_run), "--sink", "tensorboard"])) == 0
    assert (full_run / "report.md").is_file() and (full_run / "tensorboard").is_dir()
    with pytest.raises(UsageError, match="is not a run directory"):
        run_report_cli(parser.parse_args(["--run-dir", str(tmp_path / "missing")]))


def _write_eval_samples(run: Path, arm: str, t: int, right: dict[str, set[int]],
                        sample_counts: list[int] | None = None, old_format: bool = False) -> None:
    """eval_samples.jsonl of one evaluation as the evaluate stage writes it: questions q0, q1, ... of
    each set (gold 7), those in right[set] answered 7 greedily; with sample_counts, 4 samples per
    question of the first set, that many right. old_format: the loop's first rows (no kind)."""
    from imm_ray.data.problems import Problem
    from imm_ray.evaluate import evaluate_completions, sample_rows
    from imm_ray.generate.engine import Completion
    from imm_ray.run import layout

    def completion(ok: bool) -> Completion:
        return Completion(text=f"The answer is {7 if ok else 8}.", finish_reason="stop", num_tokens=5)

    rows = []
    for i, (name, correct) in enumerate(right.items()):
        size = 10 if name == "id-set" else 4
        problems = [Problem(id=f"q{j}", question="?", answer="7", dataset=name) for j in range(size)]
        greedy = [completion(j in correct) for j in range(size)]
        sampled = ([[completion(s < c) for s in range(4)] for c in sample_counts]
                   if sample_counts is not None and i == 0 else None)
        ev = evaluate_completions(name, problems, [c.text for c in greedy],
                                  [[c.text for c in s] for s in sampled] if sampled else None)
        rows += sample_rows(name, problems, ev, greedy, sampled)
    if old_format:
        rows = [{k: r[k] for k in ("dataset", "problem_id", "gold", "completion", "extracted", "correct")}
                for r in rows]
    folder = run / layout.round_folder(arm, t)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.EVAL_SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_ledger_pass_at_k_and_paired_comparison(tmp_path):
    # ID set q0..q9, OOD set q0..q3; the sets of questions answered right:
    #   base   ID {0,1,6}          OOD {0,1}    (+ 4 samples per ID question: q0 1 right, q1 4, others 0)
    #   imm 1  ID {0,1,2,6}        OOD {0,1}
    #   imm 2  ID {0,1,2,3,4,5}    OOD {0}
    #   si 1   (no eval_samples.jsonl: a run from before the ledger)
    #   si 2   ID {0,1,6}          OOD {0,1,2}  (the loop's first row format)
    run = _write_run(tmp_path / "run", [
        _row("base", 0, 0.3, 0.5), _row("imm", 1, 0.4, 0.5), _row("imm", 2, 0.6, 0.25),
        _row("si", 1, 0.3, 0.5), _row("si", 2, 0.3, 0.75)])
    _write_eval_samples(run, "base", 0, {"id-set": {0, 1, 6}, "ood-set": {0, 1}}, [1, 4] + [0] * 8)
    _write_eval_samples(run, "imm", 1, {"id-set": {0, 1, 2, 6}, "ood-set": {0, 1}})
    _write_eval_samples(run, "imm", 2, {"id-set": {0, 1, 2, 3, 4, 5}, "ood-set": {0}})
    _write_eval_samples(run, "si", 2, {"id-set": {0, 1, 6}, "ood-set": {0, 1, 2}}, old_format=True)
    text = read_text(write_report(run))
    lines = text.splitlines()

    # Ledger. imm 2 against base: gained q2 q3 q4 q5, lost q6; against imm 1: gained q3 q4 q5, lost q6;
    # OOD lost q1 against both. si 2 against base: nothing changed on ID, gained q2 on OOD; no si 1 ledger.
    assert "| arm | round | id-set vs base | id-set vs prev | ood-set vs base | ood-set vs prev |" in lines
    assert "| imm | 1 | +1 / -0 (net +1) | +1 / -0 (net +1) | +0 / -0 (net +0) | +0 / -0 (net +0) |" in lines
    assert "| imm | 2 | +4 / -1 (net +3) | +3 / -1 (net +2) | +0 / -1 (net -1) | +0 / -1 (net -1) |" in lines
    assert "| si | 1 | n/a | n/a | n/a | n/a |" in lines
    assert "| si | 2 | +0 / -0 (net +0) | n/a | +1 / -0 (net +1) | n/a |" in lines
    assert "Ledger unavailable (no per-question records in eval_samples.jsonl) for: si round 1." in lines

    # pass@k of the base model on the ID set, k = 4: pass@1 = (1/4 + 4/4) / 10 = 12.5%;
    # pass@4 = 1 for q0 and q1 (n - c < k), 0 for the rest: 2 / 10 = 20.0%. No samples on OOD.
    assert "| base | 0 | 12.5% / 20.0% (k=4) | n/a |" in lines
    assert "| imm | 2 | n/a | n/a |" in lines

    # imm 2 - si 2, ID: both right q0 q1, only imm q2..q5 (4), only si q6 (1): difference +30 points,
    # Wald half width 1.96 * sqrt((5/10 - 0.09) / 10) = 39.7 points; McNemar 2 * (1 + 5) / 2^5 = 0.375.
    # OOD: only si right on q1 and q2: -50 points, half width 1.96 * sqrt((2/4 - 0.25) / 4) = 49.0;
    # McNemar 2 * 1 / 2^2 = 0.5. Round 1 has no si ledger: no row.
    assert ("| 2 | imm - si | id-set | 10 | 60.0% | 30.0% | +30.0 [-9.7, +69.7] | 4 / 1 | 0.375 |") in lines
    assert ("| 2 | imm - si | ood-set | 4 | 25.0% | 75.0% | -50.0 [-99.0, -1.0] | 0 / 2 | 0.5 |") in lines
    assert not any(line.startswith("| 1 | imm - si") for line in lines)


@pytest.mark.parametrize(("values", "top"), [([30.0, 62.0], 70), ([1.0, 2.0], 10), ([40.0, 99.0], 100)])
def test_accuracy_axes_start_at_zero_and_end_at_the_next_ten(values, top):
    import matplotlib.pyplot as plt

    from imm_ray.report.plots import _accuracy_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1], values)
    _accuracy_axis(ax)
    assert ax.get_ylim() == (0, top)
    plt.close(fig)


def test_report_draws_the_merge_sweep_frontier(tmp_path):
    def sweep(chosen: int) -> dict:
        cands = [(0.0, 0.30, 0.20), (0.5, 0.36, 0.22), (1.0, 0.40, 0.15), (0.75, 0.35, 0.18)]
        return {"select": "frontier", "rule": "frontier: the stated rule", "probe_n": {"id-set": 50, "ood-set": 25},
                "start": {"model": "/m/orig", "id": 0.3, "ood": 0.2, "accuracy": {}},
                "candidates": [{"params": {"lam": lam, "drop_rate": 0.2}, "id": i, "ood": o, "accuracy": {}}
                               for lam, i, o in cands],
                "chosen": {"index": chosen, "params": {"lam": cands[chosen][0], "drop_rate": 0.2}}}
    rows = [_row("base", 0, 0.3, 0.2), {**_row("imm", 1, 0.35, 0.21), "sweep": sweep(1)},
            {**_row("imm", 2, 0.38, 0.2), "sweep": sweep(2)}, _row("si", 1, 0.4, 0.1)]
    run = _write_run(tmp_path / "run", rows)
    text = read_text(write_report(run))
    assert "## Merge sweep" in text and "50 of id-set, 25 of ood-set" in text and "frontier: the stated rule" in text
    lines = text.splitlines()
    assert "| imm | 1 | start model | 30.0% | 20.0% |  |  |" in lines
    assert "| imm | 1 | lam=0.5 | 36.0% | 22.0% | yes | chosen |" in lines
    assert "| imm | 1 | lam=0 | 30.0% | 20.0% |  |  |" in lines  # dominated by lam=0.5
    assert "| imm | 2 | lam=1 | 40.0% | 15.0% | yes | chosen |" in lines
    assert "| imm | 2 | lam=0.75 | 35.0% | 18.0% |  |  |" in lines
    assert (run / "plots/frontier.png").read_bytes()[:8] == PNG_MAGIC and "plots/frontier.png" in text
    assert flatten_row(rows[2])["merge/lam"] == 1.0
