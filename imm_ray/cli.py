"""The ``imm`` command: ``run`` (the IMM loop), ``merge``, ``eval``, ``serve``, ``report``, ``analyze``, ``config``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imm_ray.cli_flags import add_data_dir, add_ray_address, add_run_dir
from imm_ray.errors import UsageError, add_common_arguments, dispatch

if TYPE_CHECKING:
    from imm_ray.config import ImmConfig

logger = logging.getLogger("imm_ray")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps (the driver adds a file handler in the run directory)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def shipped_configs() -> list[Path]:
    """The run configs that ship with imm-ray (``jobs/configs/*.yaml``, package data of ``jobs``)."""
    import jobs

    return sorted((Path(jobs.__file__).parent / "configs").glob("*.yaml"))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (as a user would type it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def add_config_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--preset`` and ``key.sub=value`` overrides: how a run config is built."""
    parser.add_argument("--config", metavar="YAML", help="run config file (shipped ones: jobs/configs/*.yaml)")
    parser.add_argument("--preset", help="named preset applied under the file: paper or cpu-small")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values in YAML (keys: imm config show, docs/config.md)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imm run`` / ``python -m jobs.imm_run``."""
    add_config_source_arguments(parser)
    add_run_dir(parser, "default $IMM_RUNS_DIR/<run.name>, IMM_RUNS_DIR defaulting to runs; "
                        "an existing run directory is resumed")
    add_ray_address(parser, "the config's ray.address, else $RAY_ADDRESS, else a local loopback head; "
                            "sets ray.address")
    add_data_dir(parser)
    parser.add_argument("--force-unlock", action="store_true",
                        help="break the run lease of another driver on an s3:// run (it stops at its next stage)")


def _missing_config_error() -> UsageError:
    shipped = [_shown(p) for p in shipped_configs()]
    example = next((p for p in shipped if p.endswith("demo.yaml")), "my-run.yaml")
    return UsageError(f"no --config given: pass a run config, e.g. --config {example} "
                      f"(shipped: {', '.join(shipped) or 'none found'}); imm config show lists every key")


def run_config(args: argparse.Namespace) -> ImmConfig:
    """The config ``imm run`` runs: the file, the preset, the overrides, then ``--ray-address`` and
    ``--data-dir`` (as ray.address and data.dir); refused without ``--config`` (the defaults alone are a
    full GSM8K run: hours on a CPU)."""
    if not args.config:
        raise _missing_config_error()
    from imm_ray.config import load_config

    flags = [f"ray.address={args.ray_address}"] * bool(args.ray_address)
    flags += [f"data.dir={args.data_dir}"] * bool(args.data_dir)
    return load_config(args.config, [*args.overrides, *flags], preset=args.preset)


def add_config_show_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imm config show``."""
    parser.add_argument("action", choices=["show"], help="show: print every key of the config tree")
    add_config_source_arguments(parser)
    parser.add_argument("--markdown", action="store_true",
                        help="print the Markdown reference (docs/config.md; make docs writes it)")


def config_command(args: argparse.Namespace) -> int:
    """Print every config key with its type, value (the defaults, or the resolved config) and meaning."""
    from imm_ray.config import load_config
    from imm_ray.config_reference import config_keys, config_markdown, config_text

    cfg = load_config(args.config, args.overrides, preset=args.preset)
    keys = config_keys(values=cfg)
    sys.stdout.write(config_markdown(keys) if args.markdown else config_text(keys))
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imm plan``."""
    add_config_source_arguments(parser)
    parser.add_argument("--gpu-gb", type=float, default=24.0, help="memory of one GPU in GiB (default 24)")
    parser.add_argument("--host-gb", type=float, default=None,
                        help="memory of one node in GiB for CPU stages (default: this machine's)")


def plan_command(args: argparse.Namespace) -> int:
    """Print each stage's estimated memory per worker and whether it fits."""
    from imm_ray.config import load_config
    from imm_ray.devices import cpu_has_bf16
    from imm_ray.plan import format_plan, model_dims, plan_stages

    cfg = load_config(args.config, args.overrides, preset=args.preset)
    host_gb = args.host_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    dims = model_dims(cfg.model.ref, cfg.model.cache_dir)
    sys.stdout.write(format_plan(plan_stages(cfg, dims, args.gpu_gb, host_gb, cpu_has_bf16()), dims,
                                 cfg.model.ref))
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, a longer description, examples, and the module that holds its
    flags (``add_arguments``) and what it runs (``run``), imported only for the command that runs, so that
    every command starts without loading the others' torch or matplotlib."""

    name: str
    help: str
    description: str
    examples: str
    module: str
    add_arguments: str
    run: str

    def functions(self) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
        """The command's (add_arguments, run) functions."""
        module = importlib.import_module(self.module)
        return getattr(module, self.add_arguments), getattr(module, self.run)


COMMANDS = [
        Command("run", "run or resume the IMM self-improvement loop",
                "Each round samples answers to the training questions, keeps the verified ones, fine-tunes on "
                "them, merges the result with the original model and evaluates it. Running the same command "
                "again resumes an interrupted run from its last finished stage.",
                "imm run --config jobs/configs/demo.yaml --run-dir runs/demo\n"
                "imm run --config jobs/configs/demo.yaml run.rounds=3 generate.num_actors=2",
                "imm_ray.loop.cli", "add_run_arguments", "run_command"),
        Command("merge", "merge checkpoints (DARE/IMM and other methods)",
                "Merge fine-tuned Hugging Face checkpoints with a base model into a new folder.",
                "imm merge --base original_model/ --model runs/demo/imm/round-001/sft --lambda 0.5 --drop-rate 0.2 "
                "--out merged/",
                "imm_ray.merge.cli", "add_merge_arguments", "run_merge_cli"),
        Command("eval", "evaluate a model on math benchmarks (accuracy, pass@k, maj@k, diversity)",
                "Greedy accuracy of a model on each data set; with --samples K and --temperature > 0 also "
                "pass@k, maj@k and the diversity of the K samples.",
                "imm eval --model runs/demo/imm/round-002/merged --dataset gsm8k --dataset svamp --limit 100\n"
                "imm eval --model embedded:smollm2-135m-instruct --dataset mawps.jsonl:input:target --engine hf",
                "imm_ray.evaluate.cli", "add_eval_arguments", "run_eval_cli"),
        Command("serve", "serve a run's rounds over an OpenAI-compatible HTTP API",
                "Serve every finished round of a run as model <run>/round-N at http://HOST:PORT/v1, and pick "
                "up new rounds while the run goes on. Stops on Ctrl-C.",
                "imm serve --run-dir runs/demo\n"
                "imm serve --run-dir runs/demo --engine hf --port 8080 resident_models=3",
                "imm_ray.serve.cli", "add_serve_arguments", "run_serve_cli"),
        Command("report", "write report.md and plots/ for a run directory",
                "Write report.md (per-round accuracy, collapse metrics, timings) and plots/ into the run "
                "directory; optionally publish the metrics to TensorBoard or MLflow.",
                "imm report --run-dir runs/demo\nimm report --run-dir s3://bucket/runs/demo --sink tensorboard",
                "imm_ray.report.cli", "add_report_arguments", "run_report_cli"),
        Command("analyze", "per-layer parameter change vs layer importance",
                "Compare every round's models with the original layer by layer and measure each layer's "
                "importance on a probe of the run's in-domain test set; writes analysis.json.",
                "imm analyze --run-dir runs/demo --probe-size 16\n"
                "imm analyze --original base/ --model tuned=ft/ --probe-preset gsm8k --out a.json --no-ray",
                "imm_ray.analysis.cli", "add_analyze_arguments", "run_analyze_cli"),
        Command("plan", "estimate every stage's memory per worker (SFT with ddp and fsdp) and whether it fits",
                "Print, for each stage, the estimated memory per worker (weights, gradients, optimizer, activations "
                "at the configured micro-batch and length, KV cache), the node type it lands on and whether it fits "
                "a GPU of --gpu-gb (GPU stages) or a node of --host-gb (CPU stages); SFT for both strategies.",
                "imm plan --config jobs/configs/paper-qwen2.5-7b.yaml\n"
                "imm plan --config jobs/configs/paper-qwen2.5-0.5b.yaml --gpu-gb 80 train.micro_batch_size=16",
                __name__, "add_plan_arguments", "plan_command"),
        Command("config", "show every config key with its type, default and meaning",
                "Print every key of the run configuration with its type, value and meaning: the defaults, or "
                "the resolved config of --config/--preset/overrides.",
                "imm config show\nimm config show --config jobs/configs/demo.yaml generate.temperature=0.9\n"
                "imm config show --markdown > docs/config.md",
                __name__, "add_config_show_arguments", "config_command"),
]


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option or --log-level's value)."""
    names = {c.name for c in COMMANDS}
    skip = False
    for token in argv:
        if not skip and not token.startswith("-"):
            return token if token in names else None
        skip = token == "--log-level"
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``imm`` argument parser with its subcommands; only ``command``'s flags when it is given."""
    parser = argparse.ArgumentParser(
        prog="imm", description="Iterative Model Merging on Ray", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every failure is one line 'imm <command>: error: ...' on stderr, exit status 2 (--debug adds the "
               "traceback).\nimm <command> --help shows a command's flags and examples.")
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        examples = "\n".join(f"  {line}" for line in cmd.examples.splitlines())
        parser_ = sub.add_parser(cmd.name, help=cmd.help, description=textwrap.fill(cmd.description, 100),
                                 epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(parser_, before_command=False)
        if command in (None, cmd.name):
            add_arguments, run = cmd.functions()
            add_arguments(parser_)
            parser_.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imm`` console script (and of ``python -m jobs.imm_run``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    setup_logging(args.log_level)
    return dispatch(args.func, args, f"imm {args.command}")


if __name__ == "__main__":
    sys.exit(main())
