"""``imm eval``: command-line front end of :func:`imm_ray.evaluate.harness.evaluate_model`
(``python -m imm_ray.evaluate.cli`` is the same command)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from imm_ray.cli_flags import add_data_dir, add_ray_address
from imm_ray.errors import UsageError
from imm_ray.evaluate.harness import EvalRun, evaluate_model
from imm_ray.generate.settings import EngineSettings, add_settings_arguments, settings_from_namespace
from imm_ray.storage import write_json

__all__ = ["add_eval_arguments", "run_eval_cli", "settings_from_args", "format_results"]

logger = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``imm eval`` options to ``parser``."""
    parser.add_argument("--model", required=True,
                        help="model: embedded:<name>, a local HF folder or a hub id")
    parser.add_argument("--dataset", action="append", required=True, dest="datasets", metavar="SPEC",
                        help="preset (gsm8k = its test split, svamp, asdiv) or PATH[:QUESTION_FIELD:ANSWER_FIELD"
                             "[:FORMAT]], e.g. mawps.jsonl:input:target; repeat for several")
    parser.add_argument("--limit", type=int, help="first N problems of each dataset")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="samples per question for pass@k / maj@k / diversity (needs --temperature > 0)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the k samples (accuracy is always greedy); default 0")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the k samples")
    parser.add_argument("--max-tokens", type=int, default=512, help="max new tokens (default 512)")
    parser.add_argument("--prompt-template", dest="template", choices=("chat", "alpaca"), default="chat",
                        help="how a question becomes a prompt (default chat)")
    parser.add_argument("--template", dest="template", choices=("chat", "alpaca"), help=argparse.SUPPRESS)  # older
    parser.add_argument("--system-prompt", help="system message of the chat template (default none)")
    parser.add_argument("--instruction-suffix", default=None, metavar="TEXT",
                        help="text appended to each question under the chat template "
                             "(default: ask for 'The answer is <number>.'; '' for none)")
    parser.add_argument("--verifier", default="auto",
                        help="auto (numeric when all gold answers are numbers, else math), numeric or math")
    parser.add_argument("--verify-timeout", type=float, default=5.0, metavar="S",
                        help="hard timeout per answer of the math verifier (default 5 s)")
    add_data_dir(parser)
    parser.add_argument("--out", help="write the results JSON here (printed to stdout otherwise)")
    parser.add_argument("--save-samples", metavar="FILE", help="write every completion and verdict as JSONL")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    # --engine, --dtype, --max-model-len, ...: one flag per EngineSettings field (--seed above sets its seed)
    add_settings_arguments(parser, EngineSettings(dtype="auto"), skip=("seed",))
    add_ray_address(parser, "the engine runs in this process, without Ray; 'local' starts a loopback head")
    parser.add_argument("--actors", type=int, default=1, metavar="N", help="generator actors on Ray (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per generator actor on Ray")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="converted embedded models are cached here "
                             "(default $IMM_CACHE_DIR, else ~/.cache/imm-ray)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def settings_from_args(args: argparse.Namespace) -> EvalRun:
    """EvalRun from parsed ``imm eval`` arguments; a UsageError names the flags that do not fit."""
    options = settings_from_namespace(args, seed=args.seed)
    suffix = {} if args.instruction_suffix is None else {"instruction_suffix": args.instruction_suffix}
    try:
        return EvalRun(
            engine=options.name, template=args.template, system_prompt=args.system_prompt, **suffix,
            samples=args.samples, temperature=args.temperature,
            top_p=args.top_p, max_tokens=args.max_tokens, verifier=args.verifier,
            verify_timeout_s=args.verify_timeout, seed=args.seed, engine_options=options,
            ray_address=args.ray_address, actors=args.actors, num_gpus=args.gpus_per_actor,
            progress=not args.no_progress,
        )
    except ValidationError as exc:
        raise UsageError("; ".join(str(e["ctx"]["error"]) if e["type"] == "value_error" else
                                   f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the main metrics, one row per dataset."""
    header = f"{'dataset':<16} {'n':>5} {'acc%':>6} {'ci95%':>13} {'pass@k%':>8} {'maj@k%':>7} {'k':>3} " \
             f"{'unparse':>7} {'timeout':>7} {'sec':>7}"
    lines = [header]
    for name, m in results.items():
        lo, hi = m["accuracy_ci95"] or (None, None)
        lines.append(
            f"{name[:16]:<16} {m['n']:>5} {_pct(m['accuracy']):>6} {_pct(lo) + '-' + _pct(hi):>13} "
            f"{_pct(m['pass@k']):>8} {_pct(m['maj@k']):>7} {m['k']:>3} {m['unparseable']:>7} "
            f"{m['timeouts'] + m.get('sample_timeouts', 0):>7} {m['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run ``imm eval``; bad input (data set, model or option) raises a UserError before a model is loaded."""
    results = evaluate_model(
        args.model, args.datasets, settings_from_args(args), data_dir=args.data_dir, limit=args.limit,
        cache_dir=args.cache_dir, samples_path=args.save_samples,
    )
    if args.out:
        write_json(args.out, results)
        logger.info("wrote %s", args.out)
    else:
        print(json.dumps(results, indent=2))
    print(format_results(results), file=sys.stderr if not args.out else sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imm_ray.evaluate.cli``: the same as ``imm eval``."""
    from imm_ray.cli import main as imm_main

    return imm_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
