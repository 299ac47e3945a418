"""Where ``imm eval`` generates: an engine in this process (default) or a Ray GeneratorPool.

In-process is the default because evaluation serves one model once: a Ray head and an actor
would add start-up time and a process hop for no parallelism on one machine (vLLM already runs
its engine core in its own process and batches internally). With a Ray address (a cluster, or
"local" for a loopback head) the prompts are split over ``actors`` GeneratorActors, e.g. one
per GPU. Ray is imported only on that path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from imm_ray.generate.engine import Completion, EngineOptions, SamplingSpec, create_engine

__all__ = ["Generator", "LocalGenerator", "RayGenerator", "open_generator"]

logger = logging.getLogger(__name__)


class Generator(Protocol):
    """Completes token-id prompts (sampling.n completions each) and can be closed."""

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str) -> list[list[Completion]]: ...

    def close(self) -> None: ...


class LocalGenerator:
    """An engine in this process; prompts go in chunks so that a progress bar can advance."""

    def __init__(self, engine: str, model_path: Path, options: EngineOptions,
                 chunk_size: int = 128, progress: bool = True) -> None:
        self.engine = create_engine(engine, model_path, options)
        self.chunk_size = max(1, chunk_size)
        self.progress = progress

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            for start in range(0, len(prompts), self.chunk_size):
                chunk = prompts[start : start + self.chunk_size]
                out += self.engine.generate(chunk, sampling)
                bar.update(len(chunk))
        return out

    def close(self) -> None:
        self.engine.close()


class RayGenerator:
    """A GeneratorPool of ``actors`` engines on the Ray cluster at ``address``."""

    def __init__(self, engine: str, model_path: Path, options: EngineOptions, address: str,
                 actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 chunk_size: int = 128, progress: bool = True) -> None:
        from imm_ray.ray_env import use_loopback_ray

        local = address == "local"
        if local and not use_loopback_ray():
            logger.warning("Ray was imported before use_loopback_ray(): the local head may not bind loopback")
        import ray

        from imm_ray.generate.actors import GeneratorPool, PoolSpec

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            logger.info("connecting to Ray (%s)", "a local loopback head" if local else address)
            ray.init(address=None if local else address, include_dashboard=False)
        spec = PoolSpec(engine=engine, options=options, num_actors=actors, num_cpus=num_cpus,
                        num_gpus=num_gpus, chunk_size=chunk_size)
        self.pool = GeneratorPool(spec, progress=progress)
        self.pool.load(model_path)

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str) -> list[list[Completion]]:
        return self.pool.generate(prompts, sampling, desc=desc)

    def close(self) -> None:
        import ray

        self.pool.shutdown()
        if self._started_ray:
            ray.shutdown()


def open_generator(
    engine: str,
    model_path: Path,
    options: EngineOptions,
    ray_address: str | None = None,
    actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    chunk_size: int = 128,
    progress: bool = True,
) -> Generator:
    """LocalGenerator without a Ray address, else a RayGenerator ("local" = loopback head)."""
    if ray_address:
        return RayGenerator(engine, model_path, options, ray_address, actors, num_cpus, num_gpus,
                            chunk_size, progress)
    logger.info("starting the %s engine in this process on %s", engine, model_path)
    return LocalGenerator(engine, model_path, options, chunk_size, progress)
