"""Ray Serve plumbing: deployment options from the settings, the app graph, start/stop helpers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from imm_ray.errors import UserError, unknown_name
from imm_ray.ray_env import actor_runtime_env
from imm_ray.serve.auth import load_api_keys
from imm_ray.serve.settings import ServeSettings, check_gpu_share
from imm_ray.storage import resolve as resolve_location

logger = logging.getLogger(__name__)

def deployment_options(s: ServeSettings) -> dict[str, Any]:
    """``Deployment.options(...)`` kwargs: replicas or autoscaling, resources, concurrency, backpressure."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        # Overload: Serve answers 429 + Retry-After instead of queueing without bound.
        "backpressure_config": {"status_code": 429, "retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": actor_runtime_env()},
        "graceful_shutdown_timeout_s": 30,
    }
    a = s.autoscaling
    if a.enabled:
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def settings_from_args(args: dict[str, Any]) -> tuple[ServeSettings, str]:
    """Settings and run dir from ``serve run`` builder args (``key=value``, dotted keys nest).

    ``config=FILE`` reads a YAML file first: either ServeSettings or an imm config with a ``serve``
    section; ``run_dir`` is required (or ``serve.run_dir`` in the file). Bad input raises a one-line
    `UserError`.
    """
    import yaml
    from pydantic import ValidationError

    data: dict[str, Any] = {}
    args = dict(args)
    if cfg := args.pop("config", None):
        try:
            loaded = yaml.safe_load(Path(cfg).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read the serve config {cfg}: {exc}") from None
        data = loaded.get("serve", loaded) if isinstance(loaded, dict) else {}
    for key, value in args.items():
        node = data
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    run_dir = data.pop("run_dir", None)
    if not run_dir:
        raise UserError("give the run directory: run_dir=DIR (imm serve --run-dir DIR)")
    try:
        return ServeSettings.model_validate(data), str(run_dir)
    except ValidationError as exc:
        raise UserError(_settings_error(exc)) from None


def _settings_error(exc: Any) -> str:
    """One line for the first problem of a ServeSettings validation error."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        model: Any = ServeSettings
        parents = [str(p) for p in err["loc"][:-1]]
        for part in parents:
            model = model.model_fields[part].annotation
        return unknown_name("serve setting", key, [".".join([*parents, f]) for f in model.model_fields])
    return f"serve setting {key}: {err['msg']}"


def build_application(settings: ServeSettings, run_dir: str | Path):
    """The bound Serve application (import of Ray happens here, not at module import)."""
    check_gpu_share(settings)
    from imm_ray.serve.deployment import ImmOpenAI

    keys = load_api_keys(settings.api_keys_file)
    logger.info("serving run %s with engine %s; API keys %s", run_dir, settings.engine,
                f"on ({len(keys)})" if keys else "off")
    deployment = ImmOpenAI.options(**deployment_options(settings))
    return deployment.bind(settings.model_dump(), str(resolve_location(run_dir)), list(keys))


def app_builder(args: dict[str, Any]):
    """Serve's app builder (``services.app:app``): ``run_dir=DIR [host=H port=P key=value ...]``.

    Under ``serve run IMPORT_PATH`` it is called before Ray is up: it then starts Serve's proxy on
    ``host:port``. Under a Serve config (``serve deploy``, RayService) Ray is up and the config's
    ``http_options`` decide where the proxy listens.
    """
    import ray
    from ray import serve

    from imm_ray.ray_env import ray_binds_loopback

    settings, run_dir = settings_from_args(args)
    if not ray.is_initialized():
        if not ray_binds_loopback() and not os.environ.get("RAY_ADDRESS"):
            logger.warning("a local Ray head would bind the external interface: export "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before `serve run` (see imm_ray/ray_env.py)")
        serve.start(http_options={"host": settings.host, "port": settings.port})
    elif {"host", "port"} & set(args):
        logger.warning("host/port args are ignored here: the Serve config's http_options decide where it listens")
    return build_application(settings, run_dir)


def start_serving(run_dir: str | Path, settings: ServeSettings, blocking: bool = False):
    """Start Serve's HTTP proxy on ``settings.host:port`` and deploy the app; return its handle.

    Call after ``ray.init`` (the driver) or let this start a local Ray. The app follows
    ``RUN_DIR/state.json``: the driver publishes a round just by marking its evaluate stage done.
    """
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_application(settings, run_dir)
    handle = serve.run(app, name=settings.app_name, route_prefix=settings.route_prefix, blocking=blocking)
    logger.info("serving %s at http://%s:%d%s", run_dir, settings.host, settings.port, settings.route_prefix)
    return handle
