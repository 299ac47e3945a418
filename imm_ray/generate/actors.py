"""Ray edges of generation: one engine per actor, a pool that streams prompts through the actors.

Each actor gets its whole share of a call's prompts in one streaming call: the engine holds them
all at once (its batch never drains between chunks) and yields prompts as they finish, so the
progress bar advances and the results land in order. An actor that dies mid-call (its process or
its engine's) is replaced and only its unfinished prompts are redone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from imm_ray.generate.engine import Completion, Finished, SamplingSpec, create_engine, entropy_mask
from imm_ray.generate.settings import EngineSettings
from imm_ray.placement import NodeTypes, ResourceRequest, check_on_cluster, wait_placed
from imm_ray.ray_env import actor_runtime_env
from imm_ray.storage import materialize

logger = logging.getLogger(__name__)


@ray.remote(concurrency_groups={"control": 1})
class GeneratorActor:
    """Holds one engine; a thin wrapper that forwards to it.

    ``stream`` and ``load`` run one at a time; ``close`` and ``pids`` have their own concurrency
    group, so that they answer (and close can stop vLLM's engine-core process) mid-generation.
    """

    def __init__(self, engine: str, model_path: str, options: EngineSettings, num_threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        # A checkpoint on object storage is loaded from this node's verified cache copy.
        self.engine = create_engine(engine, str(materialize(model_path)), options)

    def load(self, model_path: str) -> str:
        self.engine.load(materialize(model_path))
        return model_path

    def stream(self, indices: list[int], prompts: list[list[int]], sampling: SamplingSpec) -> Iterator[Finished]:
        """Complete ``prompts`` (round indices ``indices``), yielding finished ones by round index."""
        for batch in self.engine.stream(prompts, sampling, entropy_mask(indices, sampling)):
            yield [(indices[i], comps) for i, comps in batch]

    @ray.method(concurrency_group="control")
    def pids(self) -> list[int]:
        """This actor's process id, then its children's (vLLM's engine core)."""
        import psutil

        return [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        self.engine.close()


@dataclass(kw_only=True)
class ActorPlacement:
    """How many actors a pool runs and what each one asks of Ray (shared by the generator and verifier pools)."""

    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. {"node_1": 1}
    max_retries: int = 3  # actor replacements per call before it gives up
    placement_log_s: float = 60.0  # while the actors wait for resources, say what is pending this often
    placement_timeout_s: float = 900.0  # give up waiting for resources after this long
    node_types: NodeTypes = field(default_factory=NodeTypes)  # what an autoscaler may add, to wait for
    config_key: str = "generate.resources"  # where the resources came from, for error messages

    def request(self, what: str) -> ResourceRequest:
        res = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return ResourceRequest(what, self.config_key, res, self.num_actors)

    def reserve(self, what: str):
        """Check the actors' resources can ever be met (fail at once if not), then reserve them: the
        placement group (one bundle per actor, spread), or None when an actor asks for nothing."""
        from ray.util.placement_group import placement_group

        request = self.request(what)
        check_on_cluster(request, self.node_types)
        bundle = request.needs()
        if not bundle:
            return None
        group = placement_group([bundle] * self.num_actors, strategy="SPREAD")
        wait_placed([group.ready()], request, self.placement_log_s, self.placement_timeout_s, self.node_types)
        return group

    def actor_options(self, group, slot: int) -> dict:
        """Ray options of the actor in ``slot`` (bundle ``slot`` of ``group`` when there is one)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict = dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        if self.resources:
            opts["resources"] = dict(self.resources)
        runtime_env = actor_runtime_env()  # the one list of variables that follow the driver (AWS ones included)
        if runtime_env:
            opts["runtime_env"] = runtime_env
        if group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=slot)
        return opts


@dataclass(kw_only=True)
class PoolSpec(ActorPlacement):
    """What a generator pool's actors run and what each one asks of Ray."""

    engine: str
    options: EngineSettings


@dataclass(frozen=True)
class GenerationStats:
    """What the last :meth:`GeneratorPool.generate` did: for tokens/s and the round's record."""

    prompts: int
    completions: int
    tokens: int
    seconds: float
    retries: int  # actors replaced (and their unfinished prompts redone)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _engine_died(err: Exception) -> bool:
    """An actor's process died, or its engine did (vLLM's EngineDeadError) while the actor lived."""
    if isinstance(err, RayActorError):
        return True
    return isinstance(err, RayTaskError) and "EngineDead" in type(getattr(err, "cause", None)).__name__


def kill_quietly(actor) -> None:
    """Kill a failed actor for good (it may be gone already)."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - it is gone already
        pass


def close_actors(actors: list, group, graceful: bool, what: str) -> None:
    """Call each actor's ``close``, kill it, then remove the placement group (None: none). After an
    error (``graceful=False``) a failing close is logged and the actor killed anyway."""
    from ray.util.placement_group import remove_placement_group

    for actor in actors:
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:
            if graceful:
                raise
            logger.warning("closing a %s actor failed; killing it", what, exc_info=True)
        finally:
            ray.kill(actor)
    if group is not None:
        remove_placement_group(group)


class GeneratorPool:
    """A pool of :class:`GeneratorActor` that moves together from checkpoint to checkpoint."""

    def __init__(self, spec: PoolSpec, progress: bool = True) -> None:
        self.spec = spec
        self.progress = progress
        self.actors: list = []
        self.model_path: str | None = None  # a local folder or an object-storage URI
        self.last_stats: GenerationStats | None = None
        self._pg = None

    def _start_actor(self, slot: int, model_path: str):
        return GeneratorActor.options(**self.spec.actor_options(self._pg, slot)).remote(
            self.spec.engine, str(model_path), self.spec.options, int(max(1, self.spec.num_cpus)))

    def load(self, model_path: str | Path) -> None:
        """Make every actor serve ``model_path``, a folder or a URI (start them on first use)."""
        model_path = str(model_path)
        if self.model_path == model_path:
            return
        if not self.actors:
            self._pg = self.spec.reserve("generator actor")
            logger.info("starting %d %s generator actor(s) on %s", self.spec.num_actors, self.spec.engine, model_path)
            self.actors = [self._start_actor(j, model_path) for j in range(self.spec.num_actors)]
            ray.get([a.__ray_ready__.remote() for a in self.actors])  # engines up: start-up errors surface here
        else:
            logger.info("moving generator actors to %s", model_path)
            ray.get([a.load.remote(str(model_path)) for a in self.actors])
        self.model_path = model_path

    def _replace(self, slot: int, err: Exception) -> None:
        logger.warning("generator actor %d failed (%s: %s); starting a new one for its unfinished prompts",
                       slot, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        kill_quietly(self.actors[slot])
        self.actors[slot] = self._start_actor(slot, self.model_path)

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec,
                 desc: str = "generate") -> list[list[Completion]]:
        """Complete all prompts (prompt i on actor i mod the pool size), with a progress bar.

        Sets :attr:`last_stats` (tokens, seconds, actor replacements).
        """
        if not self.actors:
            raise RuntimeError("GeneratorPool.generate called before load(model_path)")
        start = time.monotonic()
        results: list[list[Completion] | None] = [None] * len(prompts)
        streams: dict = {}  # ObjectRefGenerator -> (actor slot, round indices not finished yet)

        def submit(slot: int, indices: list[int]) -> None:
            if indices:
                gen = self.actors[slot].stream.remote(indices, [prompts[i] for i in indices], sampling)
                streams[gen] = (slot, set(indices))

        n = len(self.actors)
        for slot in range(n):
            submit(slot, list(range(slot, len(prompts), n)))
        retries = 0
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.progress) as bar:
            while streams:
                [gen], _ = ray.wait(list(streams), num_returns=1)
                slot, left = streams[gen]
                try:
                    batch = ray.get(next(gen))
                except StopIteration:
                    del streams[gen]
                    if left:
                        raise RuntimeError(f"generator actor {slot} ended without {len(left)} prompts") from None
                    continue
                except (RayActorError, RayTaskError) as err:
                    if not _engine_died(err) or retries >= self.spec.max_retries:
                        raise
                    del streams[gen]
                    retries += 1
                    self._replace(slot, err)
                    submit(slot, sorted(left))
                    continue
                for i, comps in batch:
                    if results[i] is not None:
                        raise RuntimeError(f"prompt {i} was completed twice")
                    results[i] = comps
                    left.discard(i)
                bar.update(len(batch))
        done: list[list[Completion]] = results  # type: ignore[assignment]
        self.last_stats = GenerationStats(
            prompts=len(prompts), completions=sum(len(c) for c in done),
            tokens=sum(c.num_tokens for cs in done for c in cs), seconds=time.monotonic() - start, retries=retries)
        logger.info("%s: %d tokens in %.1f s (%.0f tokens/s)%s", desc, self.last_stats.tokens,
                    self.last_stats.seconds, self.last_stats.tokens_per_s,
                    f", {retries} actor(s) replaced" if retries else "")
        return done

    def shutdown(self, graceful: bool = True) -> None:
        """Close every engine (its own processes included), then stop the actors and free their resources.

        ``close`` runs beside a generation still in flight, so an interrupted run does not leave
        vLLM's engine-core process generating on its own. After an error (``graceful=False``) a
        failing close is logged and the actor is killed anyway, so the original error surfaces.
        """
        close_actors(self.actors, self._pg, graceful, "generator")
        self.actors, self.model_path, self._pg = [], None, None
