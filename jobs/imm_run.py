"""``ray job submit --working-dir . -- python -m jobs.imm_run --config jobs/configs/demo.yaml``."""

from __future__ import annotations

import argparse
import sys

from imm_ray.cli import add_run_arguments, run_command, setup_logging


def main(argv: list[str] | None = None) -> int:
    """Parse the run flags and run (or resume) the IMM loop."""
    parser = argparse.ArgumentParser(prog="jobs.imm_run", description="Run or resume an IMM run")
    parser.add_argument("--log-level", default="INFO")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
