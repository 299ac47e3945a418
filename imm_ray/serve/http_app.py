"""The FastAPI app: OpenAI routes, API keys, body bounds and OpenAI-style errors."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from contextlib import AsyncExitStack
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.backends import Backend
from imm_ray.serve.metrics import CONTENT_TYPE, ServerMetrics
from imm_ray.serve.page import STATIC_PREFIX, add_page_routes
from imm_ray.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenParams,
    chat_response,
    chunk,
    completion_response,
    models_list,
    new_id,
    parse_request,
    read_body,
    sse,
    usage,
    usage_chunk,
)
from imm_ray.serve.server import OpenAIServer

logger = logging.getLogger(__name__)

# Routes served without an API key: the health check, and the web page's shell and assets (they hold
# no run data, and must load so that the page can ask for the key).
OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = (STATIC_PREFIX,)


def is_open(route: str) -> bool:
    """Whether ``route`` (below the app's prefix) is served without an API key."""
    return route in OPEN_PATHS or route.startswith(OPEN_PREFIXES)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def internal_error(what: str) -> APIError:
    """Log the exception being handled under a reference; the client gets the reference and the
    exception's type, never its text (paths, internals)."""
    ref = uuid.uuid4().hex[:12]
    exc_type = type(sys.exc_info()[1]).__name__
    logger.exception("%s failed (reference %s)", what, ref)
    return APIError(500, f"{what} failed ({exc_type}); reference {ref} in the server log", type_="server_error",
                    code="internal_error")


def _route(request: Request) -> str:
    """The path below the app's route prefix (Serve mounts the app at ``root_path``)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _route_label(app: FastAPI, request: Request) -> str:
    """The matched route's template (``/v1/models/{model_id:path}``), or ``unmatched``: metric labels
    stay a fixed set whatever paths clients send."""
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            return route.path
    return "unmatched"


def create_app(server: OpenAIServer, keys: KeyChecker, metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI app of one replica: the key check and metrics around every request, OpenAI-style
    errors, the status and model routes, the generation routes and the web page."""
    metrics = metrics or ServerMetrics()
    app = FastAPI(title="imm-ray OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    _add_guard(app, keys, metrics)
    _add_error_handlers(app)
    _add_status_routes(app, server, metrics)
    _add_generation_routes(app, server, metrics)
    add_page_routes(app, server)
    return app


def _add_guard(app: FastAPI, keys: KeyChecker, metrics: ServerMetrics) -> None:
    """Check the API key (except on the open routes), turn any escaped exception into an OpenAI-style
    500, and count every request and its latency by route."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.monotonic()
        route = _route(request)
        if not is_open(route) and not keys.check(request.headers.get("authorization")):
            resp: Response = error_response(APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                type_="authentication_error", code="invalid_api_key"))
        else:
            try:
                resp = await call_next(request)
            except Exception:  # never let a replica answer a bare 500 page
                resp = error_response(internal_error(f"{request.method} {route}"))
        label = _route_label(app, request)
        metrics.requests.labels(label, str(resp.status_code)).inc()
        metrics.latency.labels(label).observe(time.monotonic() - t0)
        return resp


def _add_error_handlers(app: FastAPI) -> None:
    """API errors and Starlette's own (404, 405) answered in the OpenAI error format."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))


def _add_status_routes(app: FastAPI, server: OpenAIServer, metrics: ServerMetrics) -> None:
    """``/health``, ``/metrics`` (Prometheus) and the OpenAI model list."""

    @app.get("/health")
    async def health() -> JSONResponse:
        latest = server.latest
        body = {"status": "ok" if latest else "loading", "run": server.run,
                "latest": server.follower.catalog.model_id(latest[0]) if latest else None,
                "resident": server.resident_ids(), "spare_engines": server.pool.spares}
        if server.follower.problem:
            body["warning"] = server.follower.problem
        return JSONResponse(body, status_code=200 if latest else 503)

    @app.get("/metrics")
    async def prom() -> Response:
        metrics.resident.set(len(server.pool.resident()))
        if server.latest:
            metrics.latest_round.set(server.latest[0])
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(models_list(server.model_ids()))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        server.resolve(model_id)
        return JSONResponse(models_list([model_id])["data"][0])


def _add_generation_routes(app: FastAPI, server: OpenAIServer, metrics: ServerMetrics) -> None:
    """``/v1/chat/completions`` and ``/v1/completions``, streamed or whole."""
    limits = server.settings.limits

    async def generate(request: Request, cls: type[ChatRequest] | type[CompletionRequest]) -> Response:
        req = parse_request(cls, await read_body(request, limits.max_body_bytes), limits)
        chat = cls is ChatRequest
        stack = AsyncExitStack()
        try:
            model_id, backend, params = await server.prepare(req, stack)
        except BaseException:
            await stack.aclose()
            raise
        rid = new_id("chatcmpl" if chat else "cmpl")
        echo = req.prompt if getattr(req, "echo", False) else ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream(backend, params, stack, rid, model_id, chat, include_usage, metrics, echo)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        metrics.in_flight.inc()
        try:
            choices, tokens = await server.collect(backend, params)
        except Exception:
            raise internal_error("generation") from None
        finally:
            metrics.in_flight.dec()
            await stack.aclose()
        metrics.tokens.labels(model_id).inc(tokens)
        choices = [(echo + text, reason) for text, reason in choices]
        build = chat_response if chat else completion_response
        return JSONResponse(build(rid, model_id, choices, usage(len(params.prompt_ids), tokens)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest)


async def _stream(backend: Backend, params: GenParams, stack: AsyncExitStack, rid: str, model_id: str, chat: bool,
                  include_usage: bool, metrics: ServerMetrics, echo: str = "") -> AsyncIterator[bytes]:
    """Server-sent events in the OpenAI format, ending with ``data: [DONE]``; releases the lease.
    ``echo``: the prompt, sent first in every choice (completions' ``echo``)."""
    tokens = 0
    metrics.in_flight.inc()
    try:
        for i in range(params.n):
            if chat:
                yield sse(chunk(rid, model_id, True, i, "", None, role=True))
            elif echo:
                yield sse(chunk(rid, model_id, False, i, echo, None))
        async for d in backend.stream(params):
            tokens += d.num_tokens
            if d.text:
                yield sse(chunk(rid, model_id, chat, d.index, d.text, None))
            if d.finish_reason:
                yield sse(chunk(rid, model_id, chat, d.index, None if chat else "", d.finish_reason))
        if include_usage:
            yield sse(usage_chunk(rid, model_id, chat, usage(len(params.prompt_ids), tokens)))
        yield sse("[DONE]")
    except Exception:  # headers are sent: report in-band, as OpenAI does
        yield sse(internal_error("generation").body())
    finally:
        metrics.in_flight.dec()
        metrics.tokens.labels(model_id).inc(tokens)
        await stack.aclose()
