"""The OpenAI-compatible server of one replica: follows a run directory and serves its rounds.

`OpenAIServer` holds the state (catalog, resident engines, the served ``latest``); `create_app`
wraps it in a FastAPI app. Neither imports Ray: services/app.py puts them in a Serve deployment,
and tests can drive them with any backend loader.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Awaitable, Callable

from imm_ray.data.prompts import encode_prompt
from imm_ray.generate.settings import EngineSettings
from imm_ray.serve.backends import Backend, start_backend
from imm_ray.serve.catalog import LATEST, RunFollower, Source, UnknownModelError, checkpoint_problem, folder_stamp
from imm_ray.serve.pool import ModelPool
from imm_ray.serve.protocol import APIError, ChatRequest, CompletionRequest, GenParams, gen_params
from imm_ray.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

BackendLoader = Callable[[Path], Awaitable[Backend]]


def engine_options(settings: ServeSettings) -> EngineSettings:
    """Engine options of the serving engines."""
    return settings.engine


class OpenAIServer:
    """Rounds of one run, an LRU of loaded engines, and ``latest`` moved only once loaded."""

    def __init__(self, settings: ServeSettings, run_dir: str | Path, loader: BackendLoader | None = None) -> None:
        self.settings = settings
        self.follower = RunFollower(run_dir, settings.arm, settings.run_name)
        options = engine_options(settings)
        self._loader = loader or (lambda path: start_backend(options.name, path, options))
        self.pool: ModelPool[Backend] = ModelPool(self._loader, lambda b: b.close(), settings.resident_models,
                                                  reload=lambda b, path: b.reload(path), spares=settings.spare_engines)
        self.latest: tuple[int, Path] | None = None  # the newest round whose engine is loaded
        self._task: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()
        self._tokenizer_lock = threading.Lock()
        # folder -> (its files' stamp, why it cannot be served or None): a broken or failed round is
        # answered from here until its files change, without touching an engine again
        self._verdicts: dict[Path, tuple[tuple, str | None]] = {}
        self._copies: dict[str, Path] = {}  # object-storage round -> its materialized local folder

    @property
    def run(self) -> str:
        return self.follower.catalog.run

    # --- following the run ------------------------------------------------------------------
    async def start(self, wait: bool = True) -> None:
        """Load the newest round (if any) and start following ``state.json``."""
        self.follower.poll()
        if wait:
            try:
                await self.refresh_latest()
            except APIError as exc:  # serve the other rounds; the follower retries when files change
                logger.error("the newest round cannot be served yet: %s", exc.message)
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                self.follower.poll()
                await self.refresh_latest()
            except asyncio.CancelledError:
                raise
            except APIError:  # a bad newest round (logged once by `usable`): latest stays where it was
                pass
            except Exception:  # nothing may stop the follower
                logger.exception("following %s failed; retrying", self.follower.run_dir)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def usable(self, model_id: str, path: Path) -> None:
        """Raise `APIError` 404 (folder gone) or 503 (incomplete, damaged, or failed to load before)
        unless ``path`` looks loadable; verdicts are remembered until the folder's files change."""
        stamp = await asyncio.to_thread(folder_stamp, path)
        if stamp is None:
            raise APIError(404, f"the checkpoint of {model_id} was removed from the run directory",
                           param="model", code="model_not_found")
        known = self._verdicts.get(path)
        if known is None or known[0] != stamp:
            problem = await asyncio.to_thread(checkpoint_problem, path)
            if problem:
                logger.warning("%s (%s) cannot be served: %s", model_id, path, problem)
            known = self._verdicts[path] = (stamp, problem)
        if known[1]:
            raise APIError(503, f"{model_id} cannot be served: {known[1]}", type_="service_unavailable",
                           code="model_unavailable")

    async def _failed_load(self, model_id: str, path: Path, exc: Exception) -> APIError:
        """Remember that ``path`` failed to load (until its files change); the client's error."""
        logger.error("loading %s (%s) failed", model_id, path, exc_info=exc)
        problem = f"its engine failed to load ({type(exc).__name__}; see the server log)"
        self._verdicts[path] = (await asyncio.to_thread(folder_stamp, path), problem)
        return APIError(503, f"{model_id} cannot be served: {problem}", type_="service_unavailable",
                        code="model_unavailable")

    def local_path(self, source: Source) -> Path | None:
        """The local folder of a round (None: on object storage and not materialized yet)."""
        return source if isinstance(source, Path) else self._copies.get(source)

    async def materialized(self, model_id: str, source: Source) -> Path:
        """The local folder of a round, copying it from object storage into the node cache first."""
        path = self.local_path(source)
        if path is not None:
            return path
        from imm_ray.storage import StorageError, materialize

        try:
            path = self._copies[source] = await asyncio.to_thread(materialize, source)
        except (StorageError, OSError) as exc:
            logger.warning("cannot fetch %s (%s): %s", model_id, source, exc)
            raise APIError(503, f"{model_id} cannot be served: its checkpoint on object storage is missing, "
                           f"incomplete or does not match its manifest ({type(exc).__name__})",
                           type_="service_unavailable", code="model_unavailable") from None
        return path

    def _round_ids(self) -> dict[Path, str]:
        """Local folder -> model id of the rounds available locally."""
        cat = self.follower.catalog
        return {p: cat.model_id(n) for n, src in cat.rounds.items() if (p := self.local_path(src)) is not None}

    async def refresh_latest(self) -> None:
        """Load the catalog's newest round, then point ``latest`` at it (old requests finish on the old)."""
        cat = self.follower.catalog
        n, source = cat.latest_round, cat.latest_path
        if source is None:
            return
        path = await self.materialized(cat.model_id(n), source)
        if self.latest == (n, path):
            return
        async with self._swap_lock:
            if self.latest == (n, path):
                return
            await self.usable(cat.model_id(n), path)
            t0 = time.monotonic()
            self.pool.pinned.add(path)
            try:
                await self.pool.ensure(path)
            except Exception as exc:
                self.pool.pinned.discard(path)
                raise await self._failed_load(cat.model_id(n), path, exc) from None
            except BaseException:
                self.pool.pinned.discard(path)
                raise
            old, self.latest = self.latest, (n, path)
            if old and old[1] != path:
                self.pool.pinned.discard(old[1])
                self.pool.evict()
            self.pool.replenish(path)
            logger.info("latest -> %s (%s) after %.1f s", cat.model_id(n), path, time.monotonic() - t0)

    @property
    def following(self) -> bool:
        """Whether the follower task runs (False before `start` or after it died)."""
        return self._task is not None and not self._task.done()

    async def check_engines(self) -> None:
        """Raise if an engine of this replica died (Serve's health check then replaces the replica)."""
        ids = self._round_ids()
        for path, backend in self.pool.backends():
            try:
                await backend.check()
            except Exception as exc:
                name = "a spare engine" if path is None else f"the engine of {ids.get(path, 'a dropped round')}"
                raise RuntimeError(f"{name} died ({type(exc).__name__})") from exc

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.pool.close_all()

    # --- models -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.latest is not None

    def resident_ids(self) -> list[str]:
        """Model ids of the loaded rounds (no paths: /health needs no key)."""
        ids = self._round_ids()
        return [ids[p] for p in self.pool.resident() if p in ids]

    def model_ids(self) -> list[str]:
        """Ids a client may ask for now."""
        cat = self.follower.catalog
        if self.settings.load_on_demand:
            ids = [cat.model_id(n) for n in sorted(cat.rounds)]
        else:
            resident = set(self.pool.resident())
            ids = [cat.model_id(n) for n in sorted(cat.rounds) if self.local_path(cat.rounds[n]) in resident]
        return ids + [f"{self.run}/{LATEST}"] if self.latest else ids

    def resolve(self, model: str) -> tuple[str, Source]:
        """(concrete round id, its checkpoint) for a requested id; `APIError` 404 lists the available ids."""
        cat = self.follower.catalog
        if model == f"{self.run}/{LATEST}" and self.latest:
            return cat.model_id(self.latest[0]), self.latest[1]
        try:
            n, path = cat.resolve(model)
        except UnknownModelError:
            n = path = None
        if path is None or (not self.settings.load_on_demand and self.local_path(path) not in self.pool.resident()):
            available = self.model_ids()
            raise APIError(404, f"The model {model!r} does not exist or is not loaded; available models: "
                           f"{', '.join(available) or 'none yet'}", param="model", code="model_not_found")
        return cat.model_id(n), path

    # --- generation -------------------------------------------------------------------------
    async def prepare(self, req: ChatRequest | CompletionRequest, stack: AsyncExitStack
                      ) -> tuple[str, Backend, GenParams]:
        """Resolve the model, lease its engine on ``stack``, tokenize and bound the request."""
        if not self.ready:
            raise APIError(503, "no checkpoint of this run is loaded yet", type_="service_unavailable",
                           code="not_ready", headers={"Retry-After": str(max(1, self.settings.retry_after_s))})
        model_id, source = self.resolve(req.model)
        path = await self.materialized(model_id, source)
        if not self.pool.is_resident(path):  # a resident round answers from memory
            await self.usable(model_id, path)
        try:
            backend = await stack.enter_async_context(self.pool.lease(path))
        except Exception as exc:
            raise await self._failed_load(model_id, path, exc) from None
        if req.seed is not None and req.temperature > 0 and not backend.supports_seed:
            raise APIError(400, "'seed' is not supported by this server's engine (vLLM on CPU) when sampling; "
                           "leave it out or use temperature 0", param="seed", code="unsupported_parameter")
        ids = await asyncio.to_thread(self._tokenize, req, backend.tokenizer)  # off the event loop
        return model_id, backend, gen_params(req, ids, self.settings.limits, self.settings.engine.max_model_len)

    def _tokenize(self, req: ChatRequest | CompletionRequest, tokenizer) -> list[int]:
        """Token ids of the prompt (in a worker thread; one at a time: fast tokenizers are not
        safe to call from several threads at once)."""
        if isinstance(req, CompletionRequest):
            text = req.prompt
        elif not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
        else:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            text = None
        with self._tokenizer_lock:
            if text is None:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return encode_prompt(tokenizer, text)

    @staticmethod
    async def collect(backend: Backend, params: GenParams) -> tuple[list[tuple[str, str]], int]:
        """Run to the end: (text, finish_reason) per choice and the completion tokens."""
        texts, reasons, tokens = [""] * params.n, ["stop"] * params.n, 0
        async for d in backend.stream(params):
            texts[d.index] += d.text
            tokens += d.num_tokens
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
        return list(zip(texts, reasons)), tokens

