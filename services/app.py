"""The OpenAI-compatible Ray Serve app over a run's merged checkpoints.

    serve run services.app:app run_dir=runs/demo [host=127.0.0.1] [port=8000] [engine=hf] [key=value ...]

(export ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled`` first, or point
``RAY_ADDRESS`` at a running cluster, so that a local Ray head binds 127.0.0.1). ``imm serve`` is
the same app behind the ``imm`` command.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from imm_ray.serve.auth import KeyChecker
from imm_ray.serve.http_app import create_app
from imm_ray.serve.server import OpenAIServer
from imm_ray.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


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

    async def __del__(self) -> None:
        await self.server.stop()


def app(args: dict[str, str]):
    """Serve's app builder: ``serve run services.app:app run_dir=DIR host=H port=P ...``."""
    from ray import serve as _serve

    from imm_ray.ray_env import ray_binds_loopback
    from imm_ray.serve.deploy import build_application, settings_from_args

    settings, run_dir = settings_from_args(args)
    if not ray_binds_loopback():
        logger.warning("a local Ray head would bind the external interface: export "
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled before `serve run`")
    _serve.start(http_options={"host": settings.host, "port": settings.port})
    return build_application(settings, run_dir)
