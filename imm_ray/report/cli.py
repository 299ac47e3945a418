"""``imm report RUN_DIR``: write report.md and plots/ (optionally push metrics to sinks)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from imm_ray.report.sinks import SINKS
from imm_ray.report.writer import write_report
from imm_ray.storage import exists, layout, resolve

__all__ = ["add_report_arguments", "run_report_cli"]

logger = logging.getLogger(__name__)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm report`` options to ``parser``."""
    parser.add_argument("run_dir",
                        help="run directory, a path or s3://... URI (reads metrics.jsonl, run.yaml, analysis.json)")
    parser.add_argument("--sink", action="append", default=[], choices=SINKS,
                        help="also publish the metrics: tensorboard (RUN_DIR/tensorboard) or mlflow")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: mlflow's own)")
    parser.add_argument("--mlflow-experiment", default="imm-ray")


def run_report_cli(args: argparse.Namespace) -> int:
    """Write the report of a run; 0 on success, 2 when the run directory is missing."""
    run_dir = resolve(args.run_dir)
    if not exists(run_dir / layout.CONFIG) and not exists(run_dir / layout.METRICS):
        logger.error("report: %s is not a run directory (no %s or %s)", run_dir, layout.CONFIG, layout.METRICS)
        return 2
    try:
        path = write_report(run_dir, sinks=args.sink, tracking_uri=args.mlflow_uri,
                            experiment=args.mlflow_experiment)
    except ValueError as exc:
        logger.error("report: %s", exc)
        return 2
    logger.info("wrote %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imm_ray.report.cli RUN_DIR``."""
    parser = argparse.ArgumentParser(prog="imm report", description=__doc__)
    add_report_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_report_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
