"""The one place that connects to Ray, and the one environment handed to Ray workers.

A local head listens on 127.0.0.1 only: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it
is imported, so :func:`use_loopback_ray` must run before anything imports ``ray``
(:func:`connect_ray` calls it when it starts a local head). Ray's token authentication stays on
(``RAY_AUTH_MODE=token``): a head started here gets a fresh random token in ``RAY_AUTH_TOKEN``,
which the processes it starts (raylets, workers, job drivers, Serve replicas) inherit; clients of a
head started by ``cluster/local/up.sh`` read its token file (``RAY_AUTH_TOKEN_PATH``).

:data:`FORWARDED_ENV` is the single list of variables that follow the driver to tasks and actors on
other nodes (:func:`actor_runtime_env`). Node-local settings (``IMM_NODE_CACHE_DIR``) are never
forwarded: each node keeps its own. Neither are secrets (:data:`CREDENTIAL_ENV`) by default: a
``runtime_env`` is readable by anyone holding the cluster token (``ray list tasks --detail``, the
dashboard) and keys in it would override the workers' own instance role, IRSA or Workload Identity.
``IMM_FORWARD_CREDENTIALS=1`` forwards them anyway, for an S3-compatible server without roles
(MinIO, moto) on a cluster whose nodes lack the keys; they are then visible in those listings.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from typing import Any, Mapping

from imm_ray.errors import UserError

logger = logging.getLogger(__name__)

LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}

# Variables forwarded from the driver to every task and actor (they may run on other nodes).
FORWARDED_ENV: tuple[str, ...] = (
    # model hub, tokenizers and the vLLM CPU engine
    "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
    # where imm-ray keeps converted models and finds data sets
    "IMM_CACHE_DIR", "IMM_DATA_DIR",
    # object storage, as the AWS CLI and boto3 read it: where, never who (see CREDENTIAL_ENV)
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "IMM_FORWARD_CREDENTIALS",
)
# Secrets: forwarded only when IMM_FORWARD_CREDENTIALS is 1 (workers otherwise use their node's role).
CREDENTIAL_ENV: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FORWARD_CREDENTIALS_ENV = "IMM_FORWARD_CREDENTIALS"

_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def use_loopback_ray() -> bool:
    """Set the loopback environment (unless the user set it); return False if Ray was imported already.

    With token authentication on and no token given, a fresh one goes into ``RAY_AUTH_TOKEN``: the
    head and everything it starts inherit it (Ray's default, ``~/.ray/auth_token``, is shared by
    every head of the user and written without locking when two heads start at once).
    """
    for key, value in LOOPBACK_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if os.environ["RAY_AUTH_MODE"].lower() == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return "ray" not in sys.modules


def ray_binds_loopback() -> bool:
    """Whether the imported Ray will bind a local head to 127.0.0.1."""
    # Private: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; only this constant says
    # what it read (no public API does).
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set in ``environ`` (default: this process), and the
    :data:`CREDENTIAL_ENV` ones when ``environ`` opts in with ``IMM_FORWARD_CREDENTIALS=1``."""
    environ = os.environ if environ is None else environ
    names = FORWARDED_ENV
    if environ.get(FORWARD_CREDENTIALS_ENV, "").strip().lower() in ("1", "true", "yes"):
        names += CREDENTIAL_ENV
    return {k: environ[k] for k in names if k in environ}


def actor_runtime_env() -> dict[str, Any]:
    """``runtime_env`` for ``.options(...)`` of actors and tasks: the forwarded variables (``{}`` if none)."""
    env = forwarded_env()
    return {"env_vars": env} if env else {}


def ray_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``; None means a new local head.

    Raises UserError for a dashboard URL (``http://...:8265``), which only ``ray job submit`` takes.
    """
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if address and address.split("://", 1)[0] in ("http", "https"):
        raise UserError(
            f"Ray address {address!r} is a dashboard (job submission) URL; give the cluster's GCS address "
            "(host:6379, printed by cluster/local/up.sh) or 'auto', and keep the URL in RAY_API_SERVER_ADDRESS "
            "for `ray job submit`"
        )
    return address


def _driver_runtime_env() -> dict[str, Any]:
    """:func:`actor_runtime_env` less what a submitted job's own runtime_env sets (Ray refuses both)."""
    env = forwarded_env()
    job_json = os.environ.get(_JOB_CONFIG_ENV)
    if job_json:
        import json

        job_env = (json.loads(job_json).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return {"env_vars": env} if env else {}


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool = False,
                namespace: str | None = None, log_to_driver: bool = True) -> bool:
    """Join the cluster at ``address`` / ``RAY_ADDRESS`` or start a local head on loopback.

    Every task and actor gets :func:`actor_runtime_env`'s variables. Returns True when this call
    started Ray (the caller then owns ``ray.shutdown()``), False when Ray was already initialised.
    """
    address = ray_address(address)
    if address is None and not use_loopback_ray():
        import ray

        if not ray.is_initialized():
            from ray._raylet import Config  # private: no public call re-reads Ray's settings after import

            Config.initialize("")  # re-read RAY_AUTH_MODE, as Ray does when it turns tokens on itself
            if not ray_binds_loopback():
                logger.warning("Ray was imported before imm_ray.ray_env.use_loopback_ray(): the local head will "
                               "listen on the machine's external interface, not only 127.0.0.1")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": log_to_driver,
                              "runtime_env": _driver_runtime_env() or None}
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        return True
    logger.info("starting a local Ray head on loopback (num_cpus=%s)", num_cpus)
    # address="local": never join another head this machine happens to run.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, **kwargs)
    return True
