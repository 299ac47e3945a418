"""The GPU path in one run (scripts/gpu_smoke.sh checks for a GPU first): one JSON line of results.

Steps, each timed and marked pass/fail (a failed step records its error and the script exits 1):
engine (CUDA vLLM on the embedded model, greedy answers with token entropies, tokens/s), sft-ddp and
sft-fsdp (2 optimizer steps each on 1 GPU through Ray Train), merge (IMM of the FSDP result with the
original), swap (the merged weights swapped into the running engine give the same greedy answers as
a fresh engine on them), sleep (vLLM sleep level 1 frees GPU memory, wake_up restores the answers).
Not yet covered: a chat through the Serve app (needs a run directory; `imm serve --run-dir` on a
one-round run does it). Never run on a GPU by its author (no GPU where it was written).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imm_ray.generate.engine import SamplingSpec, create_engine
from imm_ray.generate.settings import EngineSettings
from imm_ray.models import resolve_model

QUESTIONS = ["What is 12 plus 30?", "A box holds 7 pens. Sam adds 5. How many pens are there?",
             "What is 9 times 8?", "Tom has 20 apples and eats 4. How many are left?"]
GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=128, entropy_top_k=20, entropy_stride=1)


def prompts(model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in QUESTIONS]


def answers(engine: Any, ids: list[list[int]]) -> list[str]:
    return [c[0].text for c in engine.generate(ids, GREEDY)]


def gpu_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2)


def main() -> int:
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "steps": {}}
    model = resolve_model("embedded:smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="imm-gpu-smoke-"))
    ids = prompts(model)
    settings = EngineSettings(dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=False,
                              max_model_len=1024, extra={"enable_sleep_mode": True})
    state: dict[str, Any] = {}

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            record = {"pass": True, **fn()}
        except Exception as exc:  # recorded in the JSON line; the exit status says it failed
            record = {"pass": False, "error": f"{type(exc).__name__}: {exc}"}
        record["seconds"] = round(time.perf_counter() - start, 2)
        results["steps"][name] = record

    def engine_step() -> dict[str, Any]:
        state["engine"] = engine = create_engine("vllm", model, settings)
        start = time.perf_counter()
        outs = engine.generate(ids, GREEDY)
        tokens = sum(c[0].num_tokens for c in outs)
        assert all(c[0].token_entropies for c in outs), "no token entropies"
        state["base_answers"] = [c[0].text for c in outs]
        return {"tokens_per_s": round(tokens / (time.perf_counter() - start), 1)}

    def sft_step(strategy: str) -> dict[str, Any]:
        import ray

        from imm_ray.train import SFTSettings, run_sft

        data = work / "sft.jsonl"
        data.write_text("".join(json.dumps({"prompt": q, "completion": "The answer is 42."}) + "\n"
                                for q in QUESTIONS * 2), encoding="utf-8")
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        out = work / f"sft-{strategy}"
        result = run_sft(model, data, out, SFTSettings(
            strategy=strategy, use_gpu=True, num_workers=1, epochs=1, micro_batch_size=2,
            effective_batch_size=4, precision="bf16", max_failures=0), work / "storage")
        state["sft"] = out
        peak = json.loads((out / "sft_state.json").read_text())["peak_rss_mb"]
        return {"steps": result.steps, "final_loss": round(result.final_loss, 4), "host_peak_rss_mb": peak}

    def merge_step() -> dict[str, Any]:
        state["merged"] = merged = work / "merged"
        subprocess.run([sys.executable, "-m", "imm_ray.cli", "merge", "--base", str(model), "--model",
                        str(state["sft"]), "--lambda", "0.5", "--drop-rate", "0.2", "--out", str(merged)],
                       check=True)
        return {}

    def swap_step() -> dict[str, Any]:
        state["engine"].load(state["merged"])
        swapped = answers(state["engine"], ids)
        fresh = create_engine("vllm", state["merged"], settings)
        expected = answers(fresh, ids)
        fresh.close()
        assert swapped == expected, f"swapped {swapped} != fresh {expected}"
        return {"same_answers": True}

    def sleep_step() -> dict[str, Any]:
        engine = state["engine"]
        before = answers(engine, ids)
        free_awake = torch.cuda.mem_get_info()[0]
        engine.llm.sleep(level=1)
        freed = (torch.cuda.mem_get_info()[0] - free_awake) / 1024**3
        engine.llm.wake_up()
        assert answers(engine, ids) == before, "answers changed across sleep/wake_up"
        assert freed > 0, "sleep freed no GPU memory"
        return {"freed_gb": round(freed, 2)}

    step("engine", engine_step)
    step("sft-ddp", lambda: sft_step("ddp"))
    step("sft-fsdp", lambda: sft_step("fsdp"))
    step("merge", merge_step)
    step("swap", swap_step)
    step("sleep", sleep_step)
    results["driver_gpu_peak_gb"] = gpu_gb()
    results["pass"] = all(r["pass"] for r in results["steps"].values())
    print(json.dumps(results), flush=True)
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
