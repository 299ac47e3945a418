"""``imm merge``: command-line front end of :func:`imm_ray.merge.merge_checkpoints`.

``python -m imm_ray.merge.cli ...`` is the same command. ``--config merge.yaml`` reads the same
settings from YAML (keys: base, models, weights, out and the fields of
:class:`~imm_ray.merge.options.MergeOptions`: method, params, seed, dtype, include, exclude,
max_shard_size, threads, checksums, fsync); options given on the command line win.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from imm_ray.errors import add_common_arguments, dispatch, unknown_name

from .engine import merge_checkpoints
from .errors import MergeError
from .methods import get_merge_method
from .options import MergeOptions, add_options_arguments, options_from_namespace

logger = logging.getLogger(__name__)

_CONFIG_KEYS = {"base", "models", "weights", "out", *MergeOptions.model_fields}


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm merge`` options to ``parser``: the inputs and output, the method's parameters,
    and one flag per field of :class:`~imm_ray.merge.options.MergeOptions`."""
    parser.add_argument("--config", metavar="YAML", help="read the merge settings from a YAML file")
    parser.add_argument("--base", help="anchor/base HF folder (for IMM: the original model)")
    parser.add_argument("--model", action="extend", nargs="+", dest="models", metavar="DIR",
                        help="fine-tuned HF folder(s) (repeat --model or list several)")
    parser.add_argument("--out", help="output folder (must not exist)")
    parser.add_argument("--weight", action="extend", nargs="+", type=float, dest="weights", metavar="W",
                        help="per-model weight, in --model order")
    parser.add_argument("--lambda", type=float, dest="lam", metavar="L", help="task-vector scale lam")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--density", type=float, metavar="D", help="fraction kept (= 1 - drop rate)")
    rate.add_argument("--drop-rate", type=float, dest="drop_rate", metavar="P", help="DARE drop rate p")
    parser.add_argument("--rescale", choices=("exact", "l1", "none"),
                        help="DARE rescale: exact = 1/(1-p) (paper), l1 = mergekit's L1-norm match, none")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="any other method parameter (VALUE parsed as JSON, e.g. t=0.3 or lam=[0.2,0.8])")
    add_options_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_param_items(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MergeError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def params_from_args(
    args: argparse.Namespace, method: str = "imm", base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Method parameters from the command line on top of ``base``; ``--density`` / ``--drop-rate``
    go to whichever of ``density`` / ``drop_rate`` the method has (as ``1 - x`` for the other)."""
    params = dict(base or {})
    params.update(_parse_param_items(getattr(args, "param", None) or []))
    accepted = {spec.name for spec in get_merge_method(method).param_specs}
    for key, value in (("lam", args.lam), ("rescale", args.rescale), ("weights", args.weights)):
        if value is not None:
            params[key] = value
    density, drop_rate = getattr(args, "density", None), getattr(args, "drop_rate", None)
    if density is not None:
        params.update({"density": density} if "density" in accepted or "drop_rate" not in accepted
                      else {"drop_rate": 1.0 - density})
    if drop_rate is not None:
        params.update({"drop_rate": drop_rate} if "drop_rate" in accepted or "density" not in accepted
                      else {"density": 1.0 - drop_rate})
    return params


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a merge YAML; ``models`` may list paths or ``{path, weight}`` mappings."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MergeError(f"cannot read merge config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MergeError(f"{path}: a merge config must be a mapping")
    unknown = sorted(set(data) - _CONFIG_KEYS, key=str)
    if unknown:
        raise MergeError(f"{path}: {unknown_name('merge config key', unknown[0], _CONFIG_KEYS)}")
    models = data.get("models") or []
    if isinstance(models, (str, dict)):
        models = [models]
    paths, weights = [], []
    for entry in models:
        if isinstance(entry, dict):
            paths.append(entry.get("path") or entry.get("model"))
            if "weight" in entry:
                weights.append(entry["weight"])
        else:
            paths.append(entry)
    if weights and len(weights) != len(paths):
        raise MergeError(f"{path}: give a weight for every model or for none")
    data["models"] = paths
    if weights:
        data.setdefault("params", {})["weights"] = weights
    if data.get("weights") is not None:
        data.setdefault("params", {})["weights"] = data.pop("weights")
    return data


def run_merge_cli(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments; returns 0, raises MergeError on bad input (nothing published)."""
    cfg = load_config(args.config) if getattr(args, "config", None) else {}
    base, models, out = (args.base or cfg.get("base"), args.models or cfg.get("models"),
                         args.out or cfg.get("out"))
    missing = [flag for flag, v in (("--base", base), ("--model", models), ("--out", out)) if not v]
    if missing:
        raise MergeError(f"missing {', '.join(missing)} (on the command line or in --config)")
    method = getattr(args, "method", None) or cfg.get("method") or MergeOptions().method
    options = options_from_namespace(args, cfg, params_from_args(args, method, cfg.get("params")))
    out_dir = merge_checkpoints(base, models, out, options, progress=not args.no_progress)
    logger.info("merged model written to %s", out_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imm_ray.merge.cli``: ``imm merge`` without the rest of the package (the merge package
    imports nothing of imm_ray above it); failures are reported as ``imm merge`` reports them."""
    parser = argparse.ArgumentParser(prog="imm merge", description="Merge Hugging Face checkpoints (IMM and others).")
    add_common_arguments(parser)
    add_merge_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return dispatch(run_merge_cli, args, "imm merge")


if __name__ == "__main__":
    raise SystemExit(main())
