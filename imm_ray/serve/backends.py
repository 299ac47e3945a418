"""Async model backends for the HTTP server: token ids in, streamed text deltas out.

* ``vllm``: vLLM's ``AsyncLLM`` (continuous batching, true token streaming); one engine per
  checkpoint folder, so a new round is loaded beside the old one and in-flight requests finish on
  the old weights.
* any other engine of :mod:`imm_ray.generate.engine` (``hf``): the blocking ``Engine.generate`` in a
  worker thread, one request at a time; a stream then carries each choice as one delta.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Protocol

from imm_ray.generate.engine import Engine, SamplingSpec, create_engine
from imm_ray.generate.settings import EngineSettings
from imm_ray.serve.protocol import GenParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New text of one choice; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    finish_reason: str | None
    num_tokens: int  # tokens in this delta


class Backend(Protocol):
    """A loaded checkpoint that streams completions."""

    path: Path
    tokenizer: object
    supports_seed: bool  # whether a request's ``seed`` makes its sampling reproducible

    def stream(self, params: GenParams) -> AsyncIterator[Delta]: ...

    async def reload(self, path: Path) -> "Backend":
        """Load another same-architecture checkpoint into this idle engine; return it."""
        ...

    async def check(self) -> None:
        """Raise if the engine died (its process was killed)."""
        ...

    async def close(self) -> None: ...


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class VLLMAsyncBackend:
    """One ``vllm.v1.engine.async_llm.AsyncLLM`` on one checkpoint folder."""

    def __init__(self, path: Path, engine, tokenizer, gpu: bool) -> None:
        self.path, self.engine, self.tokenizer = path, engine, tokenizer
        self.supports_seed = gpu  # a per-request seed kills vLLM's CPU engine (env facts)

    @classmethod
    async def start(cls, path: Path, options: EngineSettings) -> "VLLMAsyncBackend":
        """Start the engine in a worker thread so that the serving event loop keeps answering."""
        return await asyncio.to_thread(cls._start_blocking, Path(path), options)

    @classmethod
    def _start_blocking(cls, path: Path, options: EngineSettings) -> "VLLMAsyncBackend":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from imm_ray.generate.vllm_engine import prepare_engine

        start = prepare_engine(path, options, disable_log_stats=True)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**start.kwargs))
        return cls(path, engine, _load_tokenizer(path), start.gpu)

    async def stream(self, params: GenParams) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(n=params.n, temperature=params.temperature,
                            top_p=1.0 if params.temperature == 0 else params.top_p,
                            max_tokens=params.max_tokens, stop=list(params.stop) or None,
                            seed=params.seed if self.supports_seed else None, output_kind=RequestOutputKind.DELTA)
        request_id = uuid.uuid4().hex
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=params.prompt_ids), sp, request_id):
                for o in out.outputs:
                    reason = None if o.finish_reason is None else ("length" if o.finish_reason == "length" else "stop")
                    if o.text or reason or o.token_ids:
                        yield Delta(o.index, o.text, reason, len(o.token_ids))
        except (asyncio.CancelledError, GeneratorExit):
            await self.engine.abort(request_id)  # the client went away: free the sequence
            raise

    async def reload(self, path: Path) -> "VLLMAsyncBackend":
        """Swap the weights of another same-architecture checkpoint into this (idle) engine."""
        path = Path(path)
        from imm_ray.generate.vllm_engine import log_swap

        log_swap(path, await self.engine.collective_rpc("imm_swap_weights", kwargs={"weights_path": str(path)}))
        await self.engine.reset_prefix_cache()
        self.tokenizer = await asyncio.to_thread(_load_tokenizer, path)
        self.path = path
        return self

    async def check(self) -> None:
        await self.engine.check_health()  # EngineDeadError once the engine-core process is gone

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)


class EngineBackend:
    """A blocking :class:`~imm_ray.generate.engine.Engine` behind a lock, run in a worker thread."""

    supports_seed = True

    def __init__(self, path: Path, engine: Engine, tokenizer) -> None:
        self.path, self.engine, self.tokenizer = path, engine, tokenizer
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, name: str, path: Path, options: EngineSettings) -> "EngineBackend":
        def build() -> "EngineBackend":
            return cls(Path(path), create_engine(name, path, options), _load_tokenizer(Path(path)))

        return await asyncio.to_thread(build)

    async def stream(self, params: GenParams) -> AsyncIterator[Delta]:
        spec = SamplingSpec(n=params.n, temperature=params.temperature, top_p=params.top_p,
                            max_tokens=params.max_tokens, stop=params.stop, seed=params.seed)
        async with self._lock:
            job = asyncio.ensure_future(asyncio.to_thread(self.engine.generate, [params.prompt_ids], spec))
            try:
                [comps] = await asyncio.shield(job)
            except asyncio.CancelledError:  # the thread cannot be stopped: keep the engine locked until it ends
                while not job.done():
                    try:
                        await asyncio.wait({job})
                    except asyncio.CancelledError:
                        continue
                raise
        for i, c in enumerate(comps):
            yield Delta(i, c.text, c.finish_reason, c.num_tokens)

    async def reload(self, path: Path) -> "EngineBackend":
        """Load another checkpoint into this (idle) engine."""
        path = Path(path)
        await asyncio.to_thread(self.engine.load, path)
        self.tokenizer = await asyncio.to_thread(_load_tokenizer, path)
        self.path = path
        return self

    async def check(self) -> None:
        """The engine runs in this process: it lives as long as the replica."""

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)


async def start_backend(engine: str, path: Path, options: EngineSettings) -> Backend:
    """Load ``path`` with the named engine (``vllm`` -> AsyncLLM, others -> the engine registry)."""
    if engine == "vllm":
        return await VLLMAsyncBackend.start(path, options)
    return await EngineBackend.start(engine, path, options)
