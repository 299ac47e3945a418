"""``imm run``: run or resume the IMM loop (its flags and config sources are the top CLI's)."""

from __future__ import annotations

import argparse
import os
import signal

from imm_ray.cli import add_run_arguments, run_config

__all__ = ["add_run_arguments", "run_command"]


def _terminate_as_interrupt(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def run_command(args: argparse.Namespace) -> int:
    """Run or resume an IMM run."""
    cfg = run_config(args)
    from imm_ray.ray_env import use_loopback_ray

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        use_loopback_ray()  # before Ray is imported: a local head listens on 127.0.0.1 only
    from imm_ray.loop.driver import RoundDriver

    run_dir = args.run_dir or os.path.join(os.environ.get("IMM_RUNS_DIR", "runs"), cfg.run.name)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    RoundDriver(cfg, run_dir, force_unlock=args.force_unlock).run()
    return 0
