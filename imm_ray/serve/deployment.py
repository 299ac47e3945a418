"""The Ray Serve deployment: one replica = a run follower, its resident engines and the routes.

Imported only where Ray Serve runs (``build_application`` imports it lazily); the entry point for
``serve run`` / ``serve deploy`` / a RayService is ``services.app:app``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.http_app import create_app
from imm_ray.serve.server import OpenAIServer
from imm_ray.serve.settings import ServeSettings


@serve.deployment(name="ImmOpenAI")
@serve.ingress()
class ImmOpenAI:
    """One replica: the run follower, its resident engines and the FastAPI routes."""

    async def __init__(self, settings: dict[str, Any], run_dir: str, api_keys: list[str]) -> None:
        self.server = OpenAIServer(ServeSettings.model_validate(settings), run_dir)
        self.keys = KeyChecker(tuple(api_keys))
        await self.server.start(wait=True)

    def __serve_build_asgi_app__(self):
        return create_app(self.server, self.keys)

    async def check_health(self) -> None:
        if not self.server.following:
            raise RuntimeError("the run-directory follower stopped")
        await self.server.check_engines()

    async def __del__(self) -> None:
        await self.server.stop()
