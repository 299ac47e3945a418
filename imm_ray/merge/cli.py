"""``imm merge``: command-line front end of :func:`imm_ray.merge.merge_checkpoints`.

The lead wires ``add_merge_arguments`` / ``run_merge_cli`` into the top-level ``imm`` command;
``python -m imm_ray.merge.cli`` also works on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

from .engine import DEFAULT_MAX_SHARD_SIZE, merge_checkpoints
from .errors import MergeError
from .methods import MERGE_METHODS

logger = logging.getLogger(__name__)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm merge`` options to ``parser``."""
    methods = ", ".join(sorted(MERGE_METHODS))
    parser.add_argument("--method", default="imm", help=f"merge method ({methods}); default imm")
    parser.add_argument("--base", required=True, help="anchor/base HF folder (for IMM: the original model)")
    parser.add_argument("--model", action="extend", nargs="+", required=True, dest="models", metavar="DIR",
                        help="fine-tuned HF folder(s) (repeat --model or list several)")
    parser.add_argument("--weight", action="extend", nargs="+", type=float, dest="weights", metavar="W",
                        help="per-model weight, in --model order (linear, dare_linear)")
    parser.add_argument("--lambda", type=float, dest="lam", metavar="L",
                        help="scale lam (imm, task_arithmetic)")
    parser.add_argument("--drop-rate", type=float, dest="drop_rate", metavar="P", help="DARE drop rate p")
    parser.add_argument("--rescale", choices=("exact", "l1", "none"),
                        help="DARE rescale: exact = 1/(1-p) (paper), l1 = mergekit-style L1 match, none")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="any other method parameter (VALUE parsed as JSON, else a string)")
    parser.add_argument("--seed", type=int, default=0, help="DARE seed (default 0)")
    parser.add_argument("--dtype", default=None, help="output dtype (default: the base's stored dtype)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"output shard size, e.g. 5GB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Collect the method parameters given on the command line (unset ones keep the method default)."""
    params: dict[str, Any] = {}
    for item in getattr(args, "param", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MergeError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    for key, value in (("lam", args.lam), ("drop_rate", args.drop_rate),
                       ("rescale", args.rescale), ("weights", args.weights)):
        if value is not None:
            params[key] = value
    return params


def run_merge_cli(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments; returns 0 on success, 2 on a MergeError."""
    try:
        out = merge_checkpoints(
            args.method,
            args.base,
            args.models,
            args.out,
            params=params_from_args(args),
            seed=args.seed,
            dtype=args.dtype,
            progress=not args.no_progress,
            max_shard_size=args.max_shard_size,
        )
    except MergeError as exc:
        logger.error("merge failed: %s", exc)
        return 2
    logger.info("merged model written to %s", out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m imm_ray.merge.cli ...``)."""
    parser = argparse.ArgumentParser(prog="imm merge", description="Merge HF checkpoints (IMM and friends).")
    add_merge_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_merge_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
