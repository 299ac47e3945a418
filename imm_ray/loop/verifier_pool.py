"""Ray edges of verification: verifier actors that keep their verifier (its worker processes, a
judge's engine) between calls, and a pool that hands them chunks of sample rows.

The pool is made once per run and reused by every round and arm. Chunks never split a question
(``majority`` votes over a question's samples). An actor that dies mid-call is replaced in its
placement slot and only its unfinished chunks are redone; the verdicts are the same as a single
in-process pass of the verifier over the rows.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from imm_ray.generate.actors import ActorPlacement, close_actors, kill_quietly
from imm_ray.storage import materialize
from imm_ray.verify import Verdict, get_verifier, question_chunks, verify_rows

logger = logging.getLogger(__name__)


@ray.remote
class VerifierActor:
    """Holds one open verifier; ``options["model_path"]`` (a judge's model) is materialized on this node."""

    def __init__(self, verifier: str, options: dict[str, Any], num_threads: int) -> None:
        if "model_path" in options:  # a model on object storage is loaded from this node's cache copy
            import torch

            torch.set_num_threads(max(1, num_threads))
            options = {**options, "model_path": str(materialize(options["model_path"]))}
        self.verifier = get_verifier(verifier, **options)

    def verify(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        return verify_rows(self.verifier, rows)

    def close(self) -> None:
        close = getattr(self.verifier, "close", None)
        if close is not None:
            close()


class VerifierPool:
    """:class:`VerifierActor` s placed like the generators; their verifier stays open until ``shutdown``."""

    def __init__(self, placement: ActorPlacement, verifier: str, options: dict[str, Any] | None = None,
                 progress: bool = True) -> None:
        self.placement = placement
        self.progress = progress
        self.verifier = verifier
        self.options = dict(options or {})
        self.actors: list = []
        self.last_retries = 0  # actors replaced during the last verify call
        self._pg = None
        self._lock = threading.Lock()  # concurrent arms share the pool: one call at a time

    def _start_actor(self, slot: int):
        return VerifierActor.options(**self.placement.actor_options(self._pg, slot)).remote(
            self.verifier, self.options, int(max(1, self.placement.num_cpus)))

    def _start(self) -> None:
        self._pg = self.placement.reserve("verifier actor")
        logger.info("starting %d %s verifier actor(s)", self.placement.num_actors, self.verifier)
        self.actors = [self._start_actor(j) for j in range(self.placement.num_actors)]
        ray.get([a.__ray_ready__.remote() for a in self.actors])  # start-up errors surface here

    def verify(self, rows: list[dict[str, Any]], batch_size: int) -> list[Verdict]:
        """Verdicts for ``rows``, in order, chunks spread over the actors (started on first use)."""
        with self._lock:
            if not self.actors:
                self._start()
            chunks = question_chunks(rows, batch_size)
            results: list[Verdict | None] = [None] * len(rows)
            desc = f"verify ({self.verifier})"
            with tqdm(total=len(rows), desc=desc, unit="answer", disable=not self.progress) as bar:
                self.last_retries = self._run(rows, chunks, results, bar)
            return results  # type: ignore[return-value]

    def _run(self, rows: list[dict[str, Any]], chunks: list[list[int]], results: list[Verdict | None],
             bar: tqdm) -> int:
        """Fill ``results`` chunk by chunk, replacing actors that die; returns how many were replaced."""
        queue, running = deque(range(len(chunks))), {}  # ref -> (slot, chunk)
        idle, retries = deque(range(len(self.actors))), 0
        while queue or running:
            while queue and idle:
                slot, chunk = idle.popleft(), queue.popleft()
                running[self.actors[slot].verify.remote([rows[i] for i in chunks[chunk]])] = (slot, chunk)
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, chunk = running.pop(ref)
            try:
                verdicts = ray.get(ref)
            except RayActorError as err:
                if retries >= self.placement.max_retries:
                    raise
                retries += 1
                logger.warning("verifier actor %d died (%s); starting a new one for its chunk", slot,
                               type(err).__name__)
                kill_quietly(self.actors[slot])
                self.actors[slot] = self._start_actor(slot)
                queue.append(chunk)
            else:
                for i, verdict in zip(chunks[chunk], verdicts):
                    results[i] = verdict
                bar.update(len(verdicts))
            idle.append(slot)
        return retries

    def shutdown(self, graceful: bool = True) -> None:
        """Close every verifier (worker processes, engines), stop the actors and free their resources."""
        with self._lock:
            close_actors(self.actors, self._pg, graceful, "verifier")
            self.actors, self._pg = [], None
