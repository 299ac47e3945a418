"""Hot swap under load: 32 clients chat with ``<run>/latest`` for 60 s while two new rounds land.

A fake run directory holds round 1 (the model) and, published during the load by rewriting
state.json as the driver does, rounds 2 and 3 (copies with slightly perturbed weights). The app
(Ray Serve on 127.0.0.1, vLLM AsyncLLM engines) must move ``latest`` through both without failing a
request. Then the same load runs against the engine in-process (no HTTP, no Serve) for the
overhead ratio of the HTTP path.

    python tests/bench/bench_serve_hotswap.py [--model tiny|smollm2|PATH] [--clients 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from imm_ray.ray_env import use_loopback_ray  # noqa: E402

use_loopback_ray()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves the replicas on a busy box

QUESTIONS = ["What is 2 plus 3?", "What is 7 minus 4?", "What is 6 times 2?", "What is 9 plus 8?"]
log = logging.getLogger("bench_serve")


def base_model(ref: str, work: Path) -> Path:
    if ref == "tiny":
        cached = sorted((ROOT / ".pytest_cache/d/imm-tiny-model").glob("*/config.json"))
        if cached:
            return cached[-1].parent
        from tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny")
    if ref == "smollm2":
        from imm_ray.models import resolve_model

        return resolve_model("embedded:smollm2-135m-instruct")
    return Path(ref)


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 1e-3) -> Path:
    """``src`` with every floating tensor nudged by relative Gaussian noise (same shapes)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "manifest.json"))
    g = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        for k, t in tensors.items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * (t.float().std() * scale)
                tensors[k] = (t.float() + noise).to(t.dtype).contiguous()
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    return dst


def publish(run: Path, rounds: dict[int, Path]) -> None:
    stages = {f"imm/round-{n:03d}/evaluate": {"status": "done", "info": {"model": str(p)}} for n, p in rounds.items()}
    tmp = run / ".state.json.tmp"
    tmp.write_text(json.dumps({"stages": stages}))
    os.replace(tmp, run / "state.json")


def summarize(name: str, lat: list[float], failed: int, seconds: float, extra: dict | None = None) -> dict:
    lat = sorted(lat)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0] if lat else 0.0] * 99
    row = {"path": name, "served": len(lat), "failed": failed, "p50_s": round(q[49], 3), "p99_s": round(q[98], 3),
           "req_per_s": round(len(lat) / seconds, 2), **(extra or {})}
    print(json.dumps(row), flush=True)
    return row


async def closed_loop(clients: int, seconds: float, call, on_tick=None) -> tuple[list[float], int, Counter]:
    """``clients`` coroutines calling ``call(i)`` back to back until ``seconds`` pass."""
    lat: list[float] = []
    served_by: Counter = Counter()
    failed = 0
    end = time.monotonic() + seconds

    async def client(c: int) -> None:
        nonlocal failed
        i = c
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                served_by[await call(i)] += 1
                lat.append(time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001  (counted and shown)
                failed += 1
                log.warning("request failed: %r", exc)
            i += clients

    ticker = asyncio.ensure_future(on_tick()) if on_tick else None
    await asyncio.gather(*(client(c) for c in range(clients)))
    if ticker:
        ticker.cancel()
    return lat, failed, served_by


async def http_load(base: str, run: Path, rounds: dict[int, Path], args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    model = f"{run.name}/latest"
    swaps: list[tuple[float, str]] = []
    t_start = time.monotonic()

    async def call(i: int) -> str:
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=args.max_tokens, temperature=0)
        if not swaps or swaps[-1][1] != r.model:
            swaps.append((round(time.monotonic() - t_start, 1), r.model))
        return r.model

    async def publisher() -> None:
        for n, at in ((2, args.seconds * 0.15), (3, args.seconds * 0.5)):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t_start)))
            publish(run, {k: v for k, v in rounds.items() if k <= n})
            log.info("published round %d at t=%.1f s", n, time.monotonic() - t_start)

    lat, failed, served_by = await closed_loop(args.clients, args.seconds, call, publisher)
    return summarize("http (Ray Serve + vLLM AsyncLLM)", lat, failed, args.seconds,
                     {"served_by_round": dict(served_by), "latest_seen_at_s": swaps})


async def engine_load(model: Path, args) -> dict:
    from imm_ray.data.prompts import encode_prompt
    from imm_ray.serve.backends import VLLMAsyncBackend
    from imm_ray.serve.protocol import GenParams
    from imm_ray.serve.server import OpenAIServer, engine_options

    backend = await VLLMAsyncBackend.start(model, engine_options(settings(args)))
    tok = backend.tokenizer
    prompts = [encode_prompt(tok, tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                          add_generation_prompt=True)) for q in QUESTIONS]

    async def call(i: int) -> str:
        params = GenParams(prompts[i % len(prompts)], 1, 0.0, 1.0, args.max_tokens, ())
        await OpenAIServer.collect(backend, params)
        return "in-process"

    try:
        lat, failed, _ = await closed_loop(args.clients, args.baseline_seconds, call)
    finally:
        await backend.close()
    return summarize("in-process engine (AsyncLLM)", lat, failed, args.baseline_seconds)


def settings(args):
    from imm_ray.serve.settings import LimitSettings, ServeSettings

    return ServeSettings(engine="vllm", port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
                         kv_cache_gb=1, resident_models=2, spare_engines=args.spares, poll_interval_s=0.5,
                         max_ongoing_requests=2 * args.clients, max_queued_requests=4 * args.clients,
                         limits=LimitSettings(max_tokens=args.max_tokens))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (the test model), smollm2, or a checkpoint folder")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--baseline-seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--spares", type=int, default=1, help="warm spare engines (0: every round starts an engine)")
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args()
    args.port = args.port or free_port()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        model = base_model(args.model, work)
        run = work / "benchrun"
        run.mkdir()
        rounds = {1: model, 2: perturbed_copy(model, work / "r2", 2), 3: perturbed_copy(model, work / "r3", 3)}
        publish(run, {1: model})

        import httpx
        import ray
        from ray import serve

        from imm_ray.serve.deploy import start_serving

        ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
        try:
            t0 = time.monotonic()
            start_serving(run, settings(args))
            log.info("app up in %.1f s", time.monotonic() - t0)
            base = f"http://127.0.0.1:{args.port}"
            while httpx.get(f"{base}/health").json().get("spare_engines", 0) < min(1, args.spares):
                time.sleep(1)  # the warm spare that the first swap will use
            log.info("spare engine ready after %.1f s", time.monotonic() - t0)
            rows = [asyncio.run(http_load(base, run, rounds, args))]
        finally:
            serve.shutdown()
            ray.shutdown()
        if not args.skip_baseline:
            rows.append(asyncio.run(engine_load(model, args)))
            http, eng = rows
            overhead = {
                "throughput_ratio_inproc_over_http": round(eng["req_per_s"] / max(http["req_per_s"], 1e-9), 2),
                "p50_ratio_http_over_inproc": round(http["p50_s"] / max(eng["p50_s"], 1e-9), 2),
            }
            print(json.dumps({"overhead": overhead}))
        return 0 if rows[0]["failed"] == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
