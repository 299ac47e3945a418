"""Where ``imm eval`` generates: an engine in this process (default) or a Ray GeneratorPool.

In-process is the default because evaluation serves one model once: a Ray head and an actor
would add start-up time and a process hop for no parallelism on one machine (vLLM already runs
its engine core in its own process and batches internally). With a Ray address (a cluster, or
"local" for a loopback head) the prompts are split over ``actors`` GeneratorActors, e.g. one
per GPU. Ray is imported only on that path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from imm_ray.generate.engine import Completion, Finished, SamplingSpec, collect, create_engine
from imm_ray.generate.settings import EngineSettings

__all__ = ["Generator", "LocalGenerator", "RayGenerator", "open_generator"]

logger = logging.getLogger(__name__)


class Generator(Protocol):
    """Completes token-id prompts (sampling.n completions each) and can be closed."""

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str) -> list[list[Completion]]: ...

    def close(self) -> None: ...


class LocalGenerator:
    """An engine in this process, given all prompts at once; the progress bar advances as
    prompts finish."""

    def __init__(self, engine: str, model_path: Path, options: EngineSettings, progress: bool = True) -> None:
        self.engine = create_engine(engine, model_path, options)
        self.progress = progress

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, desc: str) -> list[list[Completion]]:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            def advancing(batches: Iterator[Finished]) -> Iterator[Finished]:
                for batch in batches:
                    bar.update(len(batch))
                    yield batch

            return collect(advancing(self.engine.stream(prompts, sampling)), len(prompts))

    def close(self) -> None:
        self.engine.close()


class RayGenerator:
    """A GeneratorPool of ``actors`` engines on the Ray cluster at ``address``."""

    def __init__(self, engine: str, model_path: Path, options: EngineSettings, address: str,
                 actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, progress: bool = True) -> None:
        from imm_ray.ray_env import connect_ray

        self._started_ray = connect_ray(None if address == "local" else address)
        from imm_ray.generate.actors import GeneratorPool, PoolSpec

        spec = PoolSpec(engine=engine, options=options, num_actors=actors, num_cpus=num_cpus, num_gpus=num_gpus)
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
    options: EngineSettings,
    ray_address: str | None = None,
    actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    progress: bool = True,
) -> Generator:
    """LocalGenerator without a Ray address, else a RayGenerator ("local" = loopback head)."""
    if ray_address:
        return RayGenerator(engine, model_path, options, ray_address, actors, num_cpus, num_gpus, progress)
    logger.info("starting the %s engine in this process on %s", engine, model_path)
    return LocalGenerator(engine, model_path, options, progress)
