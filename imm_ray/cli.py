"""The ``imm`` command: ``run`` (the IMM loop), ``merge``, ``eval``, ``serve``, ``report``, ``analyze``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from imm_ray.errors import add_common_arguments, dispatch

logger = logging.getLogger("imm_ray")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps (the driver adds a file handler in the run directory)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _terminate_as_interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imm run`` / ``python -m jobs.imm_run``."""
    parser.add_argument("--config", help="YAML config file (see jobs/configs/)")
    parser.add_argument("--preset", help="named preset applied under the file (e.g. paper, cpu-small)")
    parser.add_argument(
        "--run-dir", help="run directory (default: $IMM_RUNS_DIR/<run.name>, IMM_RUNS_DIR defaulting to runs)"
    )
    parser.add_argument("--force-unlock", action="store_true",
                        help="break the run lease of another driver on an s3:// run (it stops at its next stage)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def run_command(args: argparse.Namespace) -> int:
    """Run or resume an IMM run."""
    from imm_ray.config import load_config
    from imm_ray.ray_env import use_loopback_ray

    cfg = load_config(args.config, args.overrides, preset=args.preset)
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        use_loopback_ray()  # before Ray is imported: a local head listens on 127.0.0.1 only
    from imm_ray.loop.driver import RoundDriver

    run_dir = args.run_dir or os.path.join(os.environ.get("IMM_RUNS_DIR", "runs"), cfg.run.name)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    RoundDriver(cfg, run_dir, force_unlock=args.force_unlock).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``imm`` argument parser with its subcommands."""
    from imm_ray.analysis.cli import add_analyze_arguments, run_analyze_cli
    from imm_ray.evaluate.cli import add_eval_arguments, run_eval_cli
    from imm_ray.merge.cli import add_merge_arguments, run_merge_cli
    from imm_ray.report.cli import add_report_arguments, run_report_cli
    from imm_ray.serve.cli import add_serve_arguments, run_serve_cli

    parser = argparse.ArgumentParser(prog="imm", description="Iterative Model Merging on Ray")
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        ("run", "run or resume the IMM self-improvement loop", add_run_arguments, run_command),
        ("merge", "merge checkpoints (DARE/IMM and other methods)", add_merge_arguments, run_merge_cli),
        ("eval", "evaluate a model on math benchmarks (accuracy, pass@k, maj@k, diversity)",
         add_eval_arguments, run_eval_cli),
        ("serve", "serve a run's rounds over an OpenAI-compatible HTTP API", add_serve_arguments, run_serve_cli),
        ("report", "write report.md and plots/ for a run directory", add_report_arguments, run_report_cli),
        ("analyze", "per-layer parameter change vs layer importance", add_analyze_arguments, run_analyze_cli),
    ]
    for name, help_text, add_arguments, func in commands:
        command = sub.add_parser(name, help=help_text)
        add_common_arguments(command, before_command=False)
        add_arguments(command)
        command.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imm`` console script (and of ``python -m jobs.imm_run``)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return dispatch(args.func, args, f"imm {args.command}")


if __name__ == "__main__":
    sys.exit(main())
