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

Prints one JSON object per stage and a last line with all keys (``fixed_overhead_s``,
``ours_tok_s``, ``padded_tok_s``, ``speedup``). Heavy: run it alone (it starts Ray).
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
    record = {"stage": name, "packing": settings.packing, "examples": result.examples,
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)

    model = resolve_model(args.model)
    source = train_file(args.data_dir, max(args.small, args.large))
    base = dict(epochs=args.epochs, micro_batch_size=args.micro_batch_size,
                effective_batch_size=args.effective_batch_size, max_length=args.max_length,
                cpus_per_worker=args.cpus, precision=args.precision)
    ray.init(address="local", num_cpus=max(4, args.cpus), include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
            root = Path(tmp)
            small = write_samples(model, source, args.small, root / "small.jsonl")
            large = write_samples(model, source, args.large, root / "large.jsonl")
            started = time.perf_counter()
            fixed = stage("small", model, small, SFTSettings(**base), root)
            ours = stage("large-packed", model, large, SFTSettings(**base), root)
            padded = stage("large-padded", model, large, SFTSettings(**base, packing=False), root)
    finally:
        ray.shutdown()
    summary = {
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
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
