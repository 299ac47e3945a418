"""``imm report --run-dir DIR``: write report.md and plots/ (optionally push metrics to sinks)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from imm_ray.cli_flags import add_run_dir, run_dir_of
from imm_ray.errors import UsageError
from imm_ray.report.sinks import SINKS
from imm_ray.report.writer import write_report
from imm_ray.run import layout
from imm_ray.storage import exists, resolve

__all__ = ["add_report_arguments", "run_report_cli"]

logger = logging.getLogger(__name__)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm report`` options to ``parser``."""
    add_run_dir(parser, "reads metrics.jsonl, run.yaml and analysis.json; writes report.md and plots/ there",
                positional=True)
    parser.add_argument("--sink", action="append", default=[], choices=SINKS,
                        help="also publish the metrics: tensorboard (RUN_DIR/tensorboard) or mlflow (repeatable)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: mlflow's own)")
    parser.add_argument("--mlflow-experiment", default="imm-ray", metavar="NAME",
                        help="MLflow experiment the run is logged under (default imm-ray)")


def run_report_cli(args: argparse.Namespace) -> int:
    """Write the report of a run; UsageError when the run directory is missing or is not a run's."""
    run_dir = resolve(run_dir_of(args, required=True))
    if not exists(run_dir / layout.CONFIG) and not exists(run_dir / layout.METRICS):
        raise UsageError(f"{run_dir} is not a run directory (no {layout.CONFIG} or {layout.METRICS}); "
                         "check --run-dir")
    path = write_report(run_dir, sinks=args.sink, tracking_uri=args.mlflow_uri, experiment=args.mlflow_experiment)
    logger.info("wrote %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imm_ray.report.cli``: the same as ``imm report``."""
    from imm_ray.cli import main as imm_main

    return imm_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
