"""Generation and evaluation throughput: the product's pool against raw vLLM, ray.data.llm and hf.

Issue 11's contenders, each in its own process (one engine at a time on the machine):
  (a) raw   one ``vllm.LLM.generate`` call in a plain process, no logprobs;
  (b) pool  the product's GeneratorPool through Ray, one actor, entropy metric on;
  (c) ray_data  ``ray.data.llm`` with each prompt's row duplicated k times (it keeps one sample per row);
  (d) hf    the ``hf`` engine (transformers) in a plain process;
the evaluation pair (greedy, n = 1): raw_eval and pool_eval; and entropy_check: raw vLLM with
top-20 flat log-probs on every prompt (the full computation), which also measures how far the
pool's sampled entropy estimate (every ``entropy_stride``-th prompt) is from the full one on the
very same generations. hf runs on the first ``--hf-prompts`` prompts only (its tokens/s is
measured on those). ``bench_entropy_cost.py`` measures the metric's cost side by side on one engine.

Tokens/s count generated tokens over the generation call only (engine start-up excluded) except
ray_data, whose processor starts its engine inside the timed call (``ray_data_includes_startup``).
One JSON object per contender; the last line holds every key (and the ratios).

    python tests/bench/bench_generate.py [--prompts 128] [--samples 4] [--max-tokens 320]
        [--eval-prompts 300] [--hf-prompts 32] [--skip hf,ray_data] [--model embedded:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from imm_ray.generate.vllm_engine import cpu_engine_env  # noqa: E402  (imports neither torch nor vllm)
from imm_ray.ray_env import use_loopback_ray  # noqa: E402

use_loopback_ray()
for _key, _value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **cpu_engine_env(2)}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves the actor on a busy box

log = logging.getLogger("bench_generate")
CONTENDERS = ("raw", "pool", "ray_data", "hf", "raw_eval", "pool_eval", "entropy_check")
DEMO_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"  # the contenders' engine settings are the demo's
TOP_K = 20  # the demo's generate.entropy_top_k
ENTROPY_TOLERANCE = 0.05  # stated: the sampled estimate within 5% of the all-prompt mean


def engine(args: argparse.Namespace):
    """The vLLM contenders' engine settings: the demo's (``DEMO_CONFIG``), eager, or compiled (as the
    demo) with ``--compiled``."""
    from imm_ray.config import load_config

    return load_config(DEMO_CONFIG).generate.engine.model_copy(update={"enforce_eager": not args.compiled})


def vllm_kwargs(model: Path, args: argparse.Namespace) -> dict:
    """The vLLM engine arguments the product's pool starts ``engine(args)`` with (for the raw and
    ray.data contenders: the same engine, without the package around it)."""
    from imm_ray.generate.vllm_engine import prepare_engine

    return prepare_engine(model, engine(args)).kwargs


def prompt_ids(args: argparse.Namespace, split: str, limit: int) -> tuple[Path, list[list[int]]]:
    """The model folder and the chat-rendered, tokenised GSM8K prompts (as the driver renders them;
    the questions come from $IMM_DATA_DIR when set, else from the package's bundled copy)."""
    from transformers import AutoTokenizer

    from imm_ray.data import DatasetSpec, load_problems
    from imm_ray.data.prompts import encode_prompt, render_prompt
    from imm_ray.models import resolve_model

    model = Path(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model)
    problems = load_problems(DatasetSpec(name="gsm8k", preset="gsm8k", split=split, limit=limit)).problems
    return model, [encode_prompt(tok, render_prompt(p.question, "chat", tok)) for p in problems]


def sampling(args: argparse.Namespace, evaluation: bool, entropy_top_k: int = 0):
    from imm_ray.generate.engine import SamplingSpec

    if evaluation:
        return SamplingSpec(n=1, temperature=0.0, max_tokens=args.max_tokens, seed=None)
    return SamplingSpec(n=args.samples, temperature=0.7, top_p=1.0, max_tokens=args.max_tokens, seed=0,
                        entropy_top_k=entropy_top_k)


def start_llm(model: Path, args: argparse.Namespace):
    from vllm import LLM

    return LLM(**vllm_kwargs(model, args))


def raw_params(spec, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                          logprobs=logprobs)


def run_raw(args, evaluation: bool) -> dict:
    from vllm.inputs import TokensPrompt

    model, ids = prompt_ids(args, "test" if evaluation else "train", args.eval_prompts if evaluation else args.prompts)
    llm = start_llm(model, args)
    t0 = time.monotonic()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], raw_params(sampling(args, evaluation)),
                        use_tqdm=False)
    seconds = time.monotonic() - t0
    tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
    key = "raw_eval" if evaluation else "raw"
    return {f"{key}_tok_s": tokens / seconds, f"{key}_tokens": tokens, f"{key}_s": seconds}


def run_entropy_check(args) -> dict:
    """Raw vLLM with top-20 log-probs on every prompt (the full computation): its cost, and how
    far the sampled estimate (every ``entropy_stride``-th prompt of the same generations) is from it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from imm_ray.generate.entropy import token_entropy

    model, ids = prompt_ids(args, "train", args.prompts)
    spec = sampling(args, False, TOP_K)
    llm = start_llm(model, args)
    params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                            logprobs=TOP_K)
    t0 = time.monotonic()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    seconds = time.monotonic() - t0
    per_prompt = [[token_entropy([lp.logprob for lp in pos.values() if lp.rank <= TOP_K])
                   for o in r.outputs for pos in o.logprobs] for r in outs]
    full = [e for p in per_prompt for e in p]
    sampled = [e for i, p in enumerate(per_prompt) if i % spec.entropy_stride == 0 for e in p]
    mean_full, mean_sampled = sum(full) / len(full), sum(sampled) / len(sampled)
    return {"raw_logprobs_tok_s": len(full) / seconds, "entropy_full": mean_full, "entropy_sampled": mean_sampled,
            "entropy_stride": spec.entropy_stride, "entropy_rel_err": abs(mean_sampled - mean_full) / mean_full,
            "entropy_within_tolerance": abs(mean_sampled - mean_full) <= ENTROPY_TOLERANCE * mean_full}


def run_pool(args, evaluation: bool) -> dict:
    import ray

    from imm_ray.evaluate.diversity import mean_token_entropy
    from imm_ray.generate.actors import GeneratorPool, PoolSpec

    model, ids = prompt_ids(args, "test" if evaluation else "train", args.eval_prompts if evaluation else args.prompts)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    pool = GeneratorPool(PoolSpec(engine="vllm", options=engine(args), num_actors=1, num_cpus=2),
                         progress=False)
    try:
        pool.load(model)
        outs = pool.generate(ids, sampling(args, evaluation, 0 if evaluation else TOP_K))
        stats = pool.last_stats
    finally:
        pool.shutdown(graceful=False)
        ray.shutdown()
    key = "pool_eval" if evaluation else "pool"
    result = {f"{key}_tok_s": stats.tokens_per_s, f"{key}_tokens": stats.tokens, f"{key}_s": stats.seconds}
    if not evaluation:
        result["pool_entropy_sampled"] = mean_token_entropy(
            [c.token_entropies for o in outs for c in o if c.token_entropies is not None])
    return result


def run_ray_data(args) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    model, ids = prompt_ids(args, "train", args.prompts)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    spec = sampling(args, False)
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", *cpu_engine_env(2)) if k in os.environ}
    config = vLLMEngineProcessorConfig(
        model_source=str(model), batch_size=64, concurrency=1, runtime_env={"env_vars": env},
        engine_kwargs={k: v for k, v in vllm_kwargs(model, args).items() if k != "model"},
        placement_group_config={"bundles": [{"CPU": 2}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    sp = dict(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens)
    processor = build_processor(config, preprocess=lambda row: dict(tokenized_prompt=row["ids"], sampling_params=sp),
                                postprocess=lambda row: dict(n=row["num_generated_tokens"]))
    rows = [{"ids": p} for p in ids for _ in range(spec.n)]  # k samples = k duplicated rows
    try:
        t0 = time.monotonic()
        tokens = sum(r["n"] for r in processor(ray.data.from_items(rows)).take_all())
        seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
    return {"ray_data_tok_s": tokens / seconds, "ray_data_tokens": tokens, "ray_data_s": seconds,
            "ray_data_includes_startup": True}


def run_hf(args) -> dict:
    import torch

    from imm_ray.generate.engine import create_engine
    from imm_ray.generate.settings import EngineSettings

    torch.set_num_threads(os.cpu_count() or 1)
    model, ids = prompt_ids(args, "train", min(args.prompts, args.hf_prompts))
    hf = create_engine("hf", model, EngineSettings(name="hf", dtype=engine(args).dtype, batch_size=16))
    t0 = time.monotonic()
    outs = hf.generate(ids, sampling(args, False))
    seconds = time.monotonic() - t0
    tokens = sum(c.num_tokens for o in outs for c in o)
    return {"hf_tok_s": tokens / seconds, "hf_tokens": tokens, "hf_s": seconds, "hf_prompts": len(ids)}


def run_one(name: str, args: argparse.Namespace) -> dict:
    runners = {"raw": lambda: run_raw(args, False), "raw_eval": lambda: run_raw(args, True),
               "pool": lambda: run_pool(args, False), "pool_eval": lambda: run_pool(args, True),
               "ray_data": lambda: run_ray_data(args), "hf": lambda: run_hf(args),
               "entropy_check": lambda: run_entropy_check(args)}
    return runners[name]()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=128, help="GSM8K train prompts (default 128)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--max-tokens", type=int, default=320, help="new tokens per sample (default 320)")
    parser.add_argument("--eval-prompts", type=int, default=300, help="greedy GSM8K test prompts (default 300)")
    parser.add_argument("--hf-prompts", type=int, default=32,
                        help="at most this many of the prompts for hf, the slowest contender (default 32)")
    parser.add_argument("--skip", default="", help="contenders to leave out, comma-separated: " + ",".join(CONTENDERS))
    parser.add_argument("--compiled", action="store_true",
                        help="compile every vLLM engine, as the demo does: slower start, faster steps")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # one contender in this process (used internally)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)), flush=True)
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(CONTENDERS):
        parser.error(f"unknown contenders in --skip: {sorted(skip - set(CONTENDERS))}; known: {CONTENDERS}")
    size = {"prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
            "eval_prompts": args.eval_prompts, "hf_prompts": args.hf_prompts}
    everything: dict = dict(size, compiled=args.compiled)
    base = [sys.executable, __file__, "--model", args.model] + [
        f"--{k.replace('_', '-')}={v}" for k, v in size.items()] + ["--compiled"] * args.compiled
    for name in CONTENDERS:
        if name in skip:
            continue
        log.info("running %s", name)
        proc = subprocess.run(base + ["--only", name], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            log.error("%s failed (exit %d):\n%s", name, proc.returncode, proc.stderr[-3000:])
            result = {f"{name}_error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            result = json.loads(lines[-1][len("RESULT "):])
        everything.update(result)
        print(json.dumps({"contender": name, **size, **result}), flush=True)
    for ratio, (num, den) in {"pool_over_raw": ("pool_tok_s", "raw_tok_s"),
                              "pool_eval_over_raw_eval": ("pool_eval_tok_s", "raw_eval_tok_s"),
                              "raw_logprobs_over_raw": ("raw_logprobs_tok_s", "raw_tok_s")}.items():
        if num in everything and den in everything:
            everything[ratio] = everything[num] / everything[den]
    print(json.dumps(everything), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
