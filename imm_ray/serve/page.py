"""The run's web page at ``/`` of the app: a static shell (open) and its JSON routes (behind the key).

The page (imm_ray/serve/static: plain HTML, JS and CSS, no third-party code) asks for the API key,
then polls ``ui/api/overview``; the side-by-side view talks to the app's own ``v1/chat/completions``.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from imm_ray.serve.page_data import PageData, PageInputError
from imm_ray.serve.protocol import APIError, read_body
from imm_ray.serve.server import OpenAIServer

STATIC_PREFIX = "/ui/static/"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Only the app itself: no script, style or request goes anywhere else.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


def _static(name: str) -> bytes | None:
    node = resources.files("imm_ray.serve").joinpath("static", name)
    return node.read_bytes() if "/" not in name and node.is_file() else None


class VoteBody(BaseModel):
    """A side-by-side preference: the compared models, the prompt, their answers, the winner (None: tie)."""

    models: list[str] = Field(min_length=2, max_length=8)
    prompt: str
    answers: list[str] = Field(min_length=2, max_length=8)
    winner: str | None = None
    blind: bool = True


async def _call(fn, *args: Any) -> JSONResponse:
    """Run a blocking reader off the event loop; a bad request becomes a 400 naming what to fix."""
    try:
        return JSONResponse(await asyncio.to_thread(fn, *args))
    except PageInputError as exc:
        raise APIError(400, str(exc), code="invalid_request") from None


def add_page_routes(app: FastAPI, server: OpenAIServer) -> None:
    """Mount the page and its data routes on ``app`` (the key check is the app's middleware)."""
    data = PageData(server.follower.run_dir, server.settings.arm, server.run)

    @app.get("/")
    async def index(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        html = (_static("index.html") or b"").decode().replace("{{BASE}}", f"{root}/")
        return HTMLResponse(html, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})

    @app.get(STATIC_PREFIX + "{name}")
    async def static(name: str) -> Response:
        body = _static(name)
        kind = _TYPES.get(name[name.rfind("."):]) if "." in name else None
        if body is None or kind is None:
            raise APIError(404, f"no page asset {name!r}", code="not_found")
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/overview")
    async def overview() -> JSONResponse:
        return await _call(data.overview)

    @app.get("/ui/api/samples")
    async def samples(arm: str, round: int, filter: str = "all", other: int | None = None,
                      offset: int = 0) -> JSONResponse:
        return await _call(data.samples, arm, round, filter, other, max(0, offset))

    @app.get("/ui/api/eval")
    async def evaluation(arm: str, round: int, filter: str = "all", offset: int = 0) -> JSONResponse:
        return await _call(data.evaluation, arm, round, filter, max(0, offset))

    @app.get("/ui/api/limits")
    async def limits() -> JSONResponse:
        lim = server.settings.limits
        return JSONResponse({"max_tokens": lim.max_tokens, "models": server.model_ids()})

    @app.post("/ui/api/votes")
    async def vote(request: Request) -> JSONResponse:
        raw = await read_body(request, server.settings.limits.max_body_bytes)
        try:
            body = VoteBody.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise APIError(400, f"vote {'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}",
                           code="invalid_request") from None
        return await _call(data.add_vote, body.models, body.prompt, body.answers, body.winner, body.blind)
