"""Ray edges of generation: one engine per actor, a pool that splits prompts across actors."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from imm_ray.generate.engine import Completion, EngineOptions, SamplingSpec, create_engine

logger = logging.getLogger(__name__)

# Environment forwarded to generator actors when the driver has it set.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE",
                  "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "IMM_CACHE_DIR")


@ray.remote(concurrency_groups={"control": 1})
class GeneratorActor:
    """Holds one engine; a thin wrapper that forwards to it.

    ``generate`` and ``load`` run one at a time; ``close`` has its own concurrency group so that
    it can stop the engine (and vLLM's engine-core process) while a generation is still running.
    """

    def __init__(self, engine: str, model_path: str, options: EngineOptions, num_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.engine = create_engine(engine, model_path, options)

    def load(self, model_path: str) -> str:
        self.engine.load(Path(model_path))
        return model_path

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        return self.engine.generate(prompts, sampling)

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        self.engine.close()


@dataclass
class PoolSpec:
    """What a pool's actors run and what each one asks of Ray."""

    engine: str
    options: EngineOptions
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    chunk_size: int = 32


class GeneratorPool:
    """A pool of :class:`GeneratorActor` that moves together from checkpoint to checkpoint."""

    def __init__(self, spec: PoolSpec, progress: bool = True) -> None:
        self.spec = spec
        self.progress = progress
        self.actors: list = []
        self.model_path: Path | None = None

    def load(self, model_path: str | Path) -> None:
        """Make every actor serve ``model_path`` (start them on first use)."""
        model_path = Path(model_path)
        if self.model_path == model_path:
            return
        if not self.actors:
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            opts = dict(num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus)
            if env:
                opts["runtime_env"] = {"env_vars": env}
            logger.info("starting %d %s generator actor(s) on %s", self.spec.num_actors, self.spec.engine, model_path)
            self.actors = [
                GeneratorActor.options(**opts).remote(
                    self.spec.engine, str(model_path), self.spec.options, int(max(1, self.spec.num_cpus))
                )
                for _ in range(self.spec.num_actors)
            ]
        else:
            logger.info("moving generator actors to %s", model_path)
            ray.get([a.load.remote(str(model_path)) for a in self.actors])
        self.model_path = model_path

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str = "generate") -> list[list[Completion]]:
        """Complete all prompts, split in chunks over the actors, with a progress bar."""
        if not self.actors:
            raise RuntimeError("GeneratorPool.generate called before load(model_path)")
        size = self.spec.chunk_size
        chunks = [(i, prompts[i : i + size]) for i in range(0, len(prompts), size)]
        pending = {
            self.actors[j % len(self.actors)].generate.remote(chunk, sampling): (start, len(chunk))
            for j, (start, chunk) in enumerate(chunks)
        }
        results: list[list[Completion] | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                start, count = pending.pop(done[0])
                results[start : start + count] = ray.get(done[0])
                bar.update(count)
        return results  # type: ignore[return-value]

    def shutdown(self, graceful: bool = True) -> None:
        """Close every engine (its own processes included), then stop the actors.

        ``close`` runs beside a generation still in flight, so an interrupted run does not leave
        vLLM's engine-core process generating on its own. After an error (``graceful=False``) a
        failing close is logged and the actor is killed anyway, so the original error surfaces.
        """
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception:
                if graceful:
                    raise
                logger.warning("closing a generator actor failed; killing it", exc_info=True)
            finally:
                ray.kill(actor)
        self.actors = []
        self.model_path = None
