"""Flags that several ``imm`` subcommands share, spelled and explained once (pure: stdlib only)."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from imm_ray.errors import UsageError

__all__ = ["add_data_dir", "add_ray_address", "add_run_dir", "flag_type", "run_dir_of"]


def add_run_dir(parser: argparse.ArgumentParser, reads: str, positional: bool = False,
                required: bool = False) -> None:
    """``--run-dir DIR`` (``reads``: what the command does with it); ``positional`` also accepts the
    older ``imm <cmd> DIR`` form (see :func:`run_dir_of`)."""
    help_text = f"run directory, a path or s3://... URI ({reads})"
    parser.add_argument("--run-dir", required=required and not positional, metavar="DIR", help=help_text)
    if positional:
        parser.add_argument("run_dir_positional", nargs="?", metavar="RUN_DIR",
                            help="the same as --run-dir (the older positional form, still accepted)")


def run_dir_of(args: argparse.Namespace, required: bool = False) -> str | None:
    """The run directory given by ``--run-dir`` or positionally; UsageError when both differ, or when
    ``required`` and neither is given."""
    flag, positional = getattr(args, "run_dir", None), getattr(args, "run_dir_positional", None)
    if flag and positional and flag != positional:
        raise UsageError(f"two run directories given ({positional} and --run-dir {flag}): give one")
    run_dir = flag or positional
    if required and not run_dir:
        raise UsageError("no run directory given: pass --run-dir DIR")
    return run_dir


def add_ray_address(parser: argparse.ArgumentParser, default_help: str = "$RAY_ADDRESS, else a local loopback head"
                    ) -> None:
    """``--ray-address ADDR``: the Ray cluster to join."""
    parser.add_argument("--ray-address", metavar="ADDR",
                        help=f"Ray cluster to join, e.g. ray://head:10001 or auto (default: {default_help})")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir DIR``: where data-set presets are looked for first."""
    parser.add_argument("--data-dir", metavar="DIR",
                        help="data root the data-set presets look in first, <DIR>/<dataset>/<split>.jsonl "
                             "(default: $IMM_DATA_DIR)")


def flag_type(annotation: Any) -> Any:
    """The type a flag generated from a settings field parses its value with: ``X`` for a field of
    type ``X`` or ``X | None`` when X is int, float, str or bool; str for anything wider."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else str
