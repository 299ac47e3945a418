"""Benchmark: the SFT stage (``run_sft`` through Ray Train), packed vs padded (``make bench-sft``).

Builds accepted-style samples from GSM8K train (``$IMM_DATA_DIR`` or the package's bundled copy): the
question as the user turn of the model's chat template, the reference solution as the response.
Then times whole stages (tokenize, Ray Train start, model load, training, writing and publishing
the checkpoint) on the embedded SmolLM2-135M:

* ``--small`` samples (default 8) with the product's settings: ``fixed_overhead_s`` is that
  stage's wall time minus its training-loop time;
* ``--large`` samples (default 512) packed (the product's default, ``ours_tok_s``) and with
  every micro-batch padded to its longest sample (``padded_tok_s``); tokens/s counts non-padding
  tokens over the whole stage's wall time.

Then the memory of sharding: ``--memory`` samples (default 64) on 2 workers with each strategy,
``ddp_peak_rss_mb`` and ``fsdp_peak_rss_mb`` (each rank's peak resident memory, by rank) beside
``imm plan``'s estimates for the same settings (``*_plan_mb``) and whether FSDP's worst rank
stays under 0.75 of DDP's (``fsdp_under_075_ddp``). ``--memory-only`` skips the throughput stages.

Prints one JSON object per stage and a last line with all keys (``fixed_overhead_s``,
``ours_tok_s``, ``padded_tok_s``, ``speedup``, the memory keys). Heavy: run it alone (it starts Ray).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from imm_ray.ray_env import use_loopback_ray

use_loopback_ray()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from imm_ray.data import DATA_DIR_ENV  # noqa: E402
from imm_ray.data.bundled import bundled_split  # noqa: E402
from imm_ray.models import resolve_model  # noqa: E402
from imm_ray.plan import GIB, model_dims, sft_parts  # noqa: E402
from imm_ray.train import SFTSettings, run_sft  # noqa: E402


def train_file(arg: str | None, count: int) -> Path:
    """GSM8K train: <the flag or $IMM_DATA_DIR>/gsm8k/train.jsonl, else the package's bundled copy;
    exits when it holds fewer than ``count`` rows."""
    root = arg or os.environ.get(DATA_DIR_ENV)
    source = Path(root) / "gsm8k" / "train.jsonl" if root else bundled_split("gsm8k", "train").path
    if not source.is_file():
        sys.exit(f"bench_sft: no gsm8k/train.jsonl under {root}; pass --data-dir")
    rows = len(source.read_text(encoding="utf-8").splitlines())
    if rows < count:
        sys.exit(f"bench_sft: {source} holds {rows} rows, fewer than the {count} asked for; pass --data-dir")
    return source


def write_samples(model: Path, source: Path, count: int, out: Path) -> Path:
    """The first `count` GSM8K training problems as prompt/completion rows (chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    with source.open(encoding="utf-8") as f, out.open("w", encoding="utf-8") as g:
        for _, line in zip(range(count), f):
            row = json.loads(line)
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                                   tokenize=False, add_generation_prompt=True)
            g.write(json.dumps({"prompt": prompt, "completion": row["answer"]}) + "\n")
    return out


def stage(name: str, model: Path, data: Path, settings: SFTSettings, root: Path) -> dict:
    """Run one SFT stage and return its JSON record."""
    result = run_sft(model, data, root / f"{name}-out", settings, storage_dir=root / "storage")
    state = json.loads((root / f"{name}-out" / "sft_state.json").read_text(encoding="utf-8"))
    record = {"stage": name, "packing": settings.packing, "examples": result.examples,
              "strategy": settings.strategy, "peak_rss_mb": state["peak_rss_mb"],
              "runtime_rss_mb": state["runtime_rss_mb"], "bf16": state["bf16"],
              "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
              "train_seconds": round(result.train_seconds, 2),
              "tok_s": round(result.tokens_per_second, 1), "timings": result.timings}
    print(json.dumps(record), flush=True)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--data-dir", help="folder with gsm8k/train.jsonl (default $IMM_DATA_DIR, else the bundled rows)")
    ap.add_argument("--small", type=int, default=8, help="samples of the fixed-overhead stage")
    ap.add_argument("--large", type=int, default=512, help="samples of the throughput stages")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--effective-batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the one SFT worker")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="autocast of all three stages (auto: bf16 where the hardware has it)")
    ap.add_argument("--memory", type=int, default=64, help="samples of the 2-worker memory stages")
    ap.add_argument("--memory-only", action="store_true", help="skip the throughput stages")
    ap.add_argument("--memory-micro-batch", type=int, default=1,
                    help="micro-batch of the memory stages (small: the model's state, which sharding splits, "
                         "outweighs the activations, which it does not)")
    ap.add_argument("--memory-max-length", type=int, default=256,
                    help="max_length of the memory stages (most GSM8K samples reach 256: micro-batches of "
                         "about micro x max_length tokens, the shape the plan assumes)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)

    model = resolve_model(args.model)
    source = train_file(args.data_dir, max(args.small, args.large))
    base = dict(epochs=args.epochs, micro_batch_size=args.micro_batch_size,
                effective_batch_size=args.effective_batch_size, max_length=args.max_length,
                cpus_per_worker=args.cpus, precision=args.precision)
    # A head of its own: never join another Ray instance found on this machine.
    ray.init(address="local", num_cpus=max(4, args.cpus), include_dashboard=False)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
            root = Path(tmp)
            memory = {**base, "micro_batch_size": args.memory_micro_batch, "max_length": args.memory_max_length,
                      "effective_batch_size": 8, "cpus_per_worker": 1}
            summary = memory_stages(model, write_samples(model, source, args.memory, root / "memory.jsonl"),
                                    memory, root)
            if not args.memory_only:
                summary |= throughput_stages(model, source, base, args, root)
    finally:
        ray.shutdown()
    summary["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    return 0


def memory_stages(model: Path, data: Path, base: dict, root: Path) -> dict:
    """2 workers with ddp, then fsdp: each rank's peak RSS and the plan's estimate."""
    dims = model_dims(str(model))
    summary: dict = {}
    for strategy in ("ddp", "fsdp"):
        settings = SFTSettings(**base, num_workers=2, strategy=strategy)
        record = stage(f"memory-{strategy}", model, data, settings, root)
        plan = sft_parts(dims, strategy, 2, settings.micro_batch_size, settings.max_length,
                         record["bf16"], settings.activation_checkpointing, "cpu")
        planned = sum(plan.values()) * GIB / 2**20
        summary |= {f"{strategy}_peak_rss_mb": record["peak_rss_mb"],
                    f"{strategy}_runtime_rss_mb": record["runtime_rss_mb"],
                    f"{strategy}_plan_mb": round(planned, 1),
                    f"{strategy}_plan_parts_mb": {k: round(v * 1024, 1) for k, v in plan.items()},
                    f"{strategy}_plan_error": round(planned / max(record["peak_rss_mb"]) - 1, 3)}
    summary["fsdp_under_075_ddp"] = max(summary["fsdp_peak_rss_mb"]) <= 0.75 * max(summary["ddp_peak_rss_mb"])
    return summary


def throughput_stages(model: Path, source: Path, base: dict, args: argparse.Namespace, root: Path) -> dict:
    """The fixed-overhead stage and the packed and padded throughput stages (one worker)."""
    small = write_samples(model, source, args.small, root / "small.jsonl")
    large = write_samples(model, source, args.large, root / "large.jsonl")
    fixed = stage("small", model, small, SFTSettings(**base), root)
    ours = stage("large-packed", model, large, SFTSettings(**base), root)
    padded = stage("large-padded", model, large, SFTSettings(**base, packing=False), root)
    return {
        "fixed_overhead_s": round(fixed["seconds"] - fixed["train_seconds"], 2),
        "small_stage_s": fixed["seconds"], "small_timings": fixed["timings"],
        "ours_tok_s": ours["tok_s"], "padded_tok_s": padded["tok_s"],
        "speedup": round(ours["tok_s"] / padded["tok_s"], 3),
        "ours_train_tok_s": round(ours["tokens"] / ours["train_seconds"], 1),
        "padded_train_tok_s": round(padded["tokens"] / padded["train_seconds"], 1),
        "small": args.small, "large": args.large, "epochs": args.epochs,
        "micro_batch_size": args.micro_batch_size,
        "effective_batch_size": args.effective_batch_size, "cpus": args.cpus,
        "precision": args.precision,
    }


if __name__ == "__main__":
    sys.exit(main())
