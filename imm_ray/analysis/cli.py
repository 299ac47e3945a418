"""``imm analyze``: layer analysis of a run directory (or of explicit checkpoints).

``imm analyze --run-dir RUN_DIR`` compares every round's sft/merged model with the run's original model,
measures layer importance on the original with the run's in-domain test set, and writes
RUN_DIR/analysis.json. ``imm analyze --original DIR --model [LABEL=]DIR ... --out FILE`` does
the same for any checkpoints (importance needs --probe-preset/--probe-path then).
``imm analyze --combine RUN_A RUN_B ...`` reads the runs' analysis.json (one run per seed) and writes
each rho with its mean and 95% interval across the runs (imm_ray.analysis.seeds). Every folder and
file may be an object-storage URI (``s3://...``): each Ray task materializes the checkpoints it
reads on its own node.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from imm_ray.analysis.importance import ProbeSpec, PromptStyle
from imm_ray.analysis.pipeline import (
    IMPORTANCE_MEASURES,
    AnalysisPlan,
    run_analysis,
)
from imm_ray.analysis.probes import (
    ModelEntry,
    discover_models,
    probe_from_run,
    read_references,
)
from imm_ray.analysis.seeds import SEED_INTERVAL, SeedCorrelation, combine_analyses
from imm_ray.cli_flags import add_data_dir, add_ray_address, add_run_dir, run_dir_of
from imm_ray.config import load_run_config
from imm_ray.errors import UsageError
from imm_ray.placement import NodeTypes, declared_node_types
from imm_ray.run import files, layout
from imm_ray.storage import Location, exists, is_published, resolve

__all__ = ["add_analyze_arguments", "analyze", "analyze_run", "build_plan", "combine_runs", "run_analyze_cli"]

logger = logging.getLogger(__name__)


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm analyze`` options to ``parser``."""
    add_run_dir(parser, f"reads run.yaml and the round models; writes {layout.ANALYSIS} there", positional=True)
    parser.add_argument("--combine", nargs="+", metavar="RUN_DIR",
                        help=f"combine these runs' {layout.ANALYSIS} (one run per seed): each rho's mean and 95%% "
                             f"interval across them, written to --out (default {layout.ANALYSIS_SEEDS} in "
                             "the runs' common folder)")
    parser.add_argument("--original", metavar="DIR", help="original model folder (default: the run's model.ref)")
    parser.add_argument("--model", action="append", default=[], metavar="[LABEL=]DIR",
                        help="a checkpoint to compare with the original (repeatable)")
    parser.add_argument("--out", metavar="FILE", help=f"output JSON (default RUN_DIR/{layout.ANALYSIS})")
    parser.add_argument("--measures", default="accuracy,loss",
                        help="importance measures: accuracy (greedy probe), loss (proxy); "
                             "'none' skips importance (default accuracy,loss)")
    parser.add_argument("--importance-model", metavar="DIR",
                        help="model whose layers are probed (default the original)")
    parser.add_argument("--probe-size", type=int, default=32, metavar="N", help="probe problems (default 32)")
    parser.add_argument("--reference-size", type=int, default=32, metavar="N",
                        help="reference solutions (default 32)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="probe generation length in new tokens "
                        "(default: the run's evaluate.max_tokens, at most 256)")
    parser.add_argument("--max-new-tokens", type=int, dest="max_tokens", help=argparse.SUPPRESS)  # older spelling
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="probe sequences per forward pass (default 16)")
    parser.add_argument("--probe-preset", help="probe data set preset (e.g. gsm8k, synthetic)")
    parser.add_argument("--probe-split", default="test", help="split of the probe data set (default test)")
    parser.add_argument("--probe-path", metavar="FILE", help="probe data file (JSONL/JSON/Parquet)")
    parser.add_argument("--answer-format", default="plain", choices=("plain", "numeric", "gsm8k"),
                        help="how --probe-path's gold answers are read (default plain)")
    add_data_dir(parser)
    parser.add_argument("--references", metavar="FILE", help="JSONL of reference solutions (prompt+completion or "
                        "question+solution); default: round 1's accepted samples, else the "
                        "original's correct probe completions")
    parser.add_argument("--prompt-template", help="prompt template (default: the run's, else chat)")
    parser.add_argument("--dtype", default="float32", help="dtype the models are loaded in (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device of the probes (default cpu)")
    parser.add_argument("--no-ray", action="store_true", help="run in this process, one call at a time")
    parser.add_argument("--tasks", type=int, metavar="N", help="parallel importance tasks (default: cluster CPUs "
                        "/ --cpus-per-task)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, metavar="N",
                        help="CPUs Ray reserves for each task (default 1)")
    parser.add_argument("--gpus-per-task", type=float, default=0.0, metavar="N",
                        help="GPUs Ray reserves for each task (default 0)")
    add_ray_address(parser)


def _parse_models(items: list[str]) -> list[ModelEntry]:
    entries = []
    for i, item in enumerate(items, start=1):
        label, sep, path = item.partition("=")
        if not sep:
            label, path = resolve(item).name, item
        entries.append(ModelEntry(label, i, "model", resolve(path).uri))
    return entries


def _probe_from_flags(args: argparse.Namespace) -> ProbeSpec:
    from imm_ray.data import DatasetSpec, load_problems

    name = args.probe_preset or Path(args.probe_path).stem
    spec = DatasetSpec(name=name, preset=args.probe_preset, path=args.probe_path,
                       split=args.probe_split,
                       **({"answer_format": args.answer_format} if args.probe_path else {}))
    problems = load_problems(spec, data_dir=args.data_dir).problems[: args.probe_size]
    return ProbeSpec(problems=tuple(problems), prompt=PromptStyle(args.prompt_template or "chat"),
                     max_new_tokens=args.max_tokens or 256)


def build_plan(args: argparse.Namespace) -> tuple[AnalysisPlan, Location]:
    """The analysis plan and the output location the arguments describe (UsageError if incomplete)."""
    given = run_dir_of(args)
    run_dir = resolve(given) if given else None
    measures = tuple(m for m in args.measures.split(",") if m and m != "none")
    for measure in measures:
        IMPORTANCE_MEASURES.lookup(measure)  # an UnknownNameError names the known measures
    models = _parse_models(args.model)
    if run_dir is not None:
        if not args.original and not exists(run_dir / layout.CONFIG):
            raise UsageError(f"{run_dir} is not a run directory (no {layout.CONFIG}): check --run-dir, "
                             "or pass --original")
        if args.original:
            original = resolve(args.original).uri
        elif is_published(run_dir / layout.ORIGINAL):  # an object-store run's own copy of its model
            original = (run_dir / layout.ORIGINAL).uri
        else:
            from imm_ray.models import resolve_model

            model_cfg = load_run_config(run_dir).model
            original = str(resolve_model(model_cfg.ref, model_cfg.cache_dir))
        models = discover_models(run_dir) + models
        out = resolve(args.out) if args.out else run_dir / layout.ANALYSIS
    else:
        if not args.original or not args.out:
            raise UsageError("without --run-dir, pass --original DIR, --model DIR ... and --out FILE")
        original, out = resolve(args.original).uri, resolve(args.out)
    probe, source = None, ""
    if measures:
        if args.probe_preset or args.probe_path:
            probe = _probe_from_flags(args)
        elif run_dir is not None:
            probe, source = probe_from_run(run_dir, args.probe_size, args.reference_size,
                                           args.max_tokens)
            if args.prompt_template:
                probe = replace(probe, prompt=replace(probe.prompt, template=args.prompt_template))
        else:
            raise UsageError("layer importance needs a probe: --probe-preset or --probe-path "
                             "(or --measures none)")
        if args.references:
            refs = tuple(read_references(args.references, args.reference_size))
            probe, source = replace(probe, references=refs), args.references
        probe = replace(probe, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    plan = AnalysisPlan(
        original=original, models=models, probe=probe, measures=measures,
        importance_model=resolve(args.importance_model).uri if args.importance_model else None,
        reference_size=args.reference_size, references_source=source, run_dir=run_dir,
        num_tasks=args.tasks or 1,
    )
    return plan, out


def analyze(plan: AnalysisPlan, out: str | Path | Location, use_ray: bool = True, ray_address: str | None = None,
            cpus_per_task: float = 1.0, gpus_per_task: float = 0.0,
            num_tasks: int | None = None) -> dict[str, Any]:
    """Run the plan (as Ray tasks unless use_ray is False) and write the JSON to ``out``."""
    from imm_ray.storage import remove_temp_siblings, resolve, write_json

    runner = None
    if use_ray:
        from imm_ray.ray_env import connect_ray

        connect_ray(ray_address)
        from imm_ray.analysis.remote import default_num_tasks, ray_runner

        runner = ray_runner(cpus_per_task, gpus_per_task)
        plan.num_tasks = num_tasks or default_num_tasks(cpus_per_task, gpus_per_task, _run_node_types(plan.run_dir))
    elif num_tasks:
        plan.num_tasks = num_tasks
    result = run_analysis(plan, runner) if runner is not None else run_analysis(plan)
    write_json(out, result)
    out_loc = resolve(out)
    remove_temp_siblings(out_loc.parent, [out_loc.name])  # what a killed earlier analysis left
    logger.info("layer analysis written to %s (%.0f s)", out, result["seconds"])
    return result


def _run_node_types(run_dir: Location | None) -> NodeTypes:
    """The node types the run declared (its run.yaml's ray.node_types / ray.cluster_yaml), if any."""
    if run_dir is None or not exists(run_dir / layout.CONFIG):
        return declared_node_types({}, None)
    ray_cfg = load_run_config(run_dir).ray
    return declared_node_types(ray_cfg.node_types, ray_cfg.cluster_yaml)


def analyze_run(run_dir: str | Path | Location, probe_size: int = 32) -> Location:
    """Analyse a run directory as ``imm analyze RUN_DIR`` does (its defaults, ``probe_size`` probe
    problems); returns the JSON's location.

    Uses the Ray connection already open in this process (a driver's), else starts one.
    Raises UsageError (a ValueError), DataError or ModelError when the run cannot be analysed.
    """
    parser = argparse.ArgumentParser(prog="imm analyze")
    add_analyze_arguments(parser)
    args = parser.parse_args(["--run-dir", str(run_dir)])
    args.probe_size = probe_size
    plan, out = build_plan(args)
    analyze(plan, out, use_ray=not args.no_ray, ray_address=args.ray_address,
            cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, num_tasks=args.tasks)
    return out


def combine_runs(runs: list[str], out: str | None) -> tuple[list[SeedCorrelation], Location]:
    """The layer analyses of ``runs`` combined across seeds, written to ``out`` (default: beside the
    runs); UsageError when a run has no analysis.json or no default location exists."""
    from datetime import datetime, timezone

    from imm_ray.storage import write_json

    locations = [resolve(run) for run in runs]
    analyses = {}
    for loc in locations:
        analysis = files.read_analysis(loc)
        if analysis is None:
            raise UsageError(f"{loc.uri} has no {layout.ANALYSIS}: run imm analyze --run-dir {loc.uri} first")
        analyses[loc.uri] = analysis
    target = resolve(out) if out else files.seed_analysis_location(locations)
    if target is None:
        raise UsageError("the runs lie in different folders: pass --out FILE")
    rows = combine_analyses(analyses)
    write_json(target, {"version": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "runs": list(analyses), "interval": SEED_INTERVAL,
                        "correlations": [row.to_json() for row in rows]})
    return rows, target


def _print_combined(rows: list[SeedCorrelation], target: Location) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.3f}"

    print(f"Spearman rho, layer importance vs parameter change, across {SEED_INTERVAL}:")
    for r in rows:
        runs = " ".join(f"{fmt(x.rho)}[{fmt(x.low)},{fmt(x.high)}]" for x in r.per_run)
        print(f"  {r.arm} round {r.round} {r.kind} {r.measure}: mean {fmt(r.mean)} "
              f"[{fmt(r.low)}, {fmt(r.high)}]  per run {runs}")
    print(f"written to {target.uri}")


def run_analyze_cli(args: argparse.Namespace) -> int:
    """Run ``imm analyze`` from parsed arguments; UsageError (and DataError/ModelError) on bad input."""
    if args.combine:
        if run_dir_of(args) or args.original or args.model:
            raise UsageError("--combine reads the runs' finished analyses: give it without --run-dir, "
                             "--original and --model")
        rows, target = combine_runs(args.combine, args.out)
        _print_combined(rows, target)
        return 0
    plan, out = build_plan(args)
    if not plan.models and plan.probe is None:
        raise UsageError("nothing to do (no models found and no importance measures)")
    analyze(plan, out, use_ray=not args.no_ray, ray_address=args.ray_address,
            cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, num_tasks=args.tasks)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m imm_ray.analysis.cli``: the same as ``imm analyze``."""
    from imm_ray.cli import main as imm_main

    return imm_main(["analyze", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
