"""A small process pool with a hard wall-clock timeout per task.

``concurrent.futures.ProcessPoolExecutor`` cannot stop one running task, so a verifier that hangs
(sympy on a pathological expression) would hold its worker forever. Here each worker has its own
pipe; the parent dispatches one task at a time to each idle worker, and a task that has not
answered by its deadline gets its worker killed (SIGKILL) and replaced. Timeouts and crashes come
back as outcomes, never as silent results.

Workers are fresh interpreters (``subprocess`` + a socket pair), not forks: safe in processes
that already run threads (torch, vLLM, Ray), and, unlike multiprocessing's "spawn", they never
re-import the caller's ``__main__`` (scripts without a main guard work).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

__all__ = ["TaskOutcome", "TimeoutPool"]

logger = logging.getLogger(__name__)

Status = Literal["ok", "timeout", "error"]


@dataclass(frozen=True)
class TaskOutcome:
    """Result of one task: status "ok" (value set), "timeout" or "error" (error set)."""

    status: Status
    value: Any = None
    error: str | None = None


def _worker_loop(conn: Connection, fn: Callable[..., Any], warmup: tuple | None) -> None:
    """Worker loop: optional untimed warm-up call, "ready", then (task_id, args) -> outcome."""
    if warmup is not None:
        try:
            fn(*warmup)
        except Exception:  # a failing warm-up only costs speed; the real tasks report errors
            pass
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, args = message
        try:
            outcome = TaskOutcome("ok", fn(*args))
        except Exception as exc:  # any failure of the task function is reported, not raised
            outcome = TaskOutcome("error", error=f"{type(exc).__name__}: {exc}")
        try:
            conn.send((task_id, outcome))
        except Exception as exc:  # unpicklable result
            conn.send((task_id, TaskOutcome("error", error=f"cannot send result: {exc}")))


def _child_main(fd: int) -> None:
    """Entry point of a worker interpreter: read (fn, warmup) from the socket, then serve."""
    conn = Connection(fd)
    fn, warmup = conn.recv()
    _worker_loop(conn, fn, warmup)


_CHILD_CODE = "import sys; from imm_ray.verify.timeout_pool import _child_main; _child_main(int(sys.argv[1]))"


class _Worker:
    def __init__(self, fn: Callable[..., Any], warmup: tuple | None) -> None:
        parent_sock, child_sock = socket.socketpair()
        # The parent's import path, so that fn (pickled by reference) imports in the child.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send((fn, warmup))
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("verifier worker %d did not exit after SIGKILL", self.process.pid)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=2)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class TimeoutPool:
    """Run ``fn(*args)`` for many argument tuples in worker processes, each with a hard timeout.

    fn must be picklable (a module-level function). Workers start lazily, run ``fn(*warmup)``
    once untimed (to import heavy modules), and are reused across ``map`` calls until ``close``.
    The timeout clock of a task starts when it is handed to a ready worker.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int = 2,
        timeout_s: float = 5.0,
        warmup: tuple | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn = fn
        self.num_workers = workers
        self.timeout_s = timeout_s
        self.warmup = warmup
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.timeouts = 0
        self.errors = 0
        self.restarts = 0

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers (the pool starts fresh ones if used again)."""
        _shutdown(self._workers)

    def _spawn(self) -> _Worker:
        worker = _Worker(self.fn, self.warmup)
        worker.deadline = time.monotonic() + self.startup_timeout_s
        return worker

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = self._spawn()
        self.restarts += 1

    def _on_message(self, index: int, results: list[TaskOutcome | None]) -> None:
        """Read one message from worker index: "ready", a task outcome, or its death."""
        worker = self._workers[index]
        try:
            task, outcome = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.exitcode
            if worker.task is None:
                raise RuntimeError(f"verifier worker died while starting (exit code {code})") from None
            logger.warning("verifier worker died on task %d (exit code %s)", worker.task, code)
            results[worker.task] = TaskOutcome("error", error=f"worker died (exit code {code})")
            self.errors += 1
            self._replace(index)
            return
        if task == "ready":
            worker.ready = True
            return
        results[task] = outcome
        self.errors += outcome.status == "error"
        worker.task = None

    def _on_deadline(self, index: int, results: list[TaskOutcome | None]) -> None:
        worker = self._workers[index]
        if worker.task is None:
            raise RuntimeError(f"verifier worker not ready after {self.startup_timeout_s:.0f} s")
        logger.debug("task %d exceeded %.1f s: killing its worker", worker.task, self.timeout_s)
        results[worker.task] = TaskOutcome("timeout", error=f"timed out after {self.timeout_s:g} s")
        self.timeouts += 1
        self._replace(index)

    def map(self, args_list: Sequence[tuple]) -> list[TaskOutcome]:
        """Outcomes of fn(*args) for every args tuple, in input order."""
        if not args_list:
            return []
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        pending = deque(range(len(args_list)))
        results: list[TaskOutcome | None] = [None] * len(args_list)
        try:
            while pending or any(w.task is not None for w in self._workers):
                for worker in self._workers:
                    if worker.ready and worker.task is None and pending:
                        task = pending.popleft()
                        worker.conn.send((task, tuple(args_list[task])))
                        worker.task, worker.deadline = task, time.monotonic() + self.timeout_s
                # Busy workers and workers still starting are the ones to hear from or time out.
                waiting = [i for i, w in enumerate(self._workers) if w.task is not None or not w.ready]
                next_deadline = min(self._workers[i].deadline for i in waiting)
                ready = wait([self._workers[i].conn for i in waiting],
                             timeout=max(0.0, next_deadline - time.monotonic()))
                for index in waiting:
                    worker = self._workers[index]
                    if worker.conn in ready:
                        self._on_message(index, results)
                    elif time.monotonic() >= worker.deadline:
                        self._on_deadline(index, results)
        except BaseException:
            self.close()  # workers may hold tasks of this call: never reuse them
            raise
        return results  # type: ignore[return-value]
