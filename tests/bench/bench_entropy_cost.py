"""What the entropy metric costs generation: side by side on one vLLM engine in one process.

Variants, interleaved over ``--reps`` rounds (each after a prefix-cache reset):
  raw      ``LLM.generate`` without the metric;
  logprobs ``LLM.generate`` asking vLLM for top-k log-probs on every ``entropy_stride``-th prompt
           (how the product measured entropy before its logits processor);
  ours     the product's way (``VLLMEngine.stream``): its logits processor computes the top-k
           entropy of every ``entropy_stride``-th prompt's rows, and of no other row;
and once at the end ``full``: the metric on every prompt, where the sampled estimate (every
stride-th prompt of that same generation) is compared with the all-prompt mean.

Tokens/s are wall-clock; ``*_cpu_ms_per_tok`` is the CPU time of this process and its engine
processes per generated token, which other jobs on a shared machine disturb less. The last line
holds every key and the ratios to ``raw``.

    python tests/bench/bench_entropy_cost.py [--prompts 48] [--samples 4] [--max-tokens 128] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generate as bg  # noqa: E402  (sets the offline / CPU-engine environment first)

log = logging.getLogger("bench_entropy_cost")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its children (vLLM's engine processes)."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    from imm_ray.evaluate.diversity import mean_token_entropy
    from imm_ray.generate.engine import collect, entropy_mask
    from imm_ray.generate.settings import EngineSettings
    from imm_ray.generate.vllm_engine import VLLMEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=0, help=argparse.SUPPRESS)  # bench_generate's helpers
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, ids = bg.prompt_ids(args, "train", args.prompts)
    engine = VLLMEngine(model, EngineSettings(**bg.ENGINE))
    spec = bg.sampling(args, False, bg.TOP_K)

    def timed(name: str, run) -> dict:
        engine.llm.reset_prefix_cache()
        t0, c0 = time.monotonic(), cpu_seconds()
        tokens = run()
        seconds, cpu = time.monotonic() - t0, cpu_seconds() - c0
        row = {"variant": name, "tokens": tokens, "s": seconds, "tok_s": tokens / seconds,
               "cpu_ms_per_tok": 1e3 * cpu / tokens}
        print(json.dumps(row), flush=True)
        return row

    def raw() -> int:
        from vllm.inputs import TokensPrompt

        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], bg.raw_params(spec),
                                   use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    def logprobs() -> int:
        from vllm.inputs import TokensPrompt

        stride, top_k = spec.entropy_stride, bg.TOP_K
        params = [bg.raw_params(spec, top_k if i % stride == 0 else None) for i in range(len(ids))]
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    def product(stride: int):
        def run() -> int:
            sampling = replace(spec, entropy_stride=stride)
            outs = collect(engine.stream(ids, sampling, entropy_mask(range(len(ids)), sampling)), len(ids))
            product.last = outs
            return sum(c.num_tokens for o in outs for c in o)
        return run

    variants = {"raw": raw, "logprobs": logprobs, "ours": product(spec.entropy_stride)}
    timed("warm-up", logprobs)  # the first log-probs call compiles vLLM's rank kernel
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, run in variants.items():
            rows[name].append(timed(name, run))
    timed("full", product(1))
    per_prompt = [[e for c in o for e in c.token_entropies] for o in product.last]
    full = [e for p in per_prompt for e in p]
    sampled = [e for i, p in enumerate(per_prompt) if i % spec.entropy_stride == 0 for e in p]
    engine.close()

    summary: dict = {"prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
                     "reps": args.reps, "entropy_top_k": bg.TOP_K, "entropy_stride": spec.entropy_stride}
    for name, rs in rows.items():
        tokens, seconds = sum(r["tokens"] for r in rs), sum(r["s"] for r in rs)
        summary[f"{name}_tok_s"] = tokens / seconds
        summary[f"{name}_cpu_ms_per_tok"] = sum(r["cpu_ms_per_tok"] * r["tokens"] for r in rs) / tokens
    for name in ("logprobs", "ours"):
        summary[f"{name}_over_raw"] = summary[f"{name}_tok_s"] / summary["raw_tok_s"]
        summary[f"{name}_cpu_over_raw"] = summary[f"{name}_cpu_ms_per_tok"] / summary["raw_cpu_ms_per_tok"]
    mean_full, mean_sampled = mean_token_entropy([full]), mean_token_entropy([sampled])
    rel_err = abs(mean_sampled - mean_full) / mean_full
    summary.update(entropy_full=mean_full, entropy_sampled=mean_sampled, entropy_rel_err=rel_err,
                   entropy_within_tolerance=rel_err <= bg.ENTROPY_TOLERANCE)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
