"""``imm serve``: serve a run directory's rounds over HTTP until stopped."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from imm_ray.cli_flags import add_ray_address, add_run_dir

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``imm serve``."""
    add_run_dir(parser, "serves its finished rounds and follows its state.json for new ones", required=True)
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--engine", choices=["vllm", "hf"], default=None, help="inference engine (default vllm)")
    parser.add_argument("--config", metavar="YAML",
                        help="serve settings: a run config (its serve section) or a mapping of serve keys")
    add_ray_address(parser, default_help="$RAY_ADDRESS, set in KubeRay pods and job drivers, where the app is "
                                         "deployed and the command exits; else a local loopback head for as "
                                         "long as the command runs")
    parser.add_argument("overrides", nargs="*",
                        help="serve settings key=value, the keys of the config's serve section without "
                             "the serve. prefix (dotted keys nest), e.g. resident_models=3")


def settings_from_cli(args: argparse.Namespace):
    """(ServeSettings, run_dir) from the parsed flags: file, then key=value overrides, then flags."""
    from imm_ray.errors import UserError
    from imm_ray.serve.deploy import settings_from_args

    bad = [kv for kv in args.overrides if "=" not in kv]
    if bad:
        raise UserError(f"serve settings are key=value (e.g. resident_models=3), got {' '.join(bad)}")
    raw: dict[str, object] = dict(kv.split("=", 1) for kv in args.overrides)
    raw["run_dir"] = args.run_dir
    if args.config:
        raw["config"] = args.config
    for key in ("host", "port", "engine"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    return settings_from_args(raw)


def run_serve_cli(args: argparse.Namespace) -> int:
    """On a running cluster, deploy the app and return (it keeps serving, as after ``serve deploy``);
    else start a local head with the app and block until SIGINT/SIGTERM."""
    from imm_ray.ray_env import connect_ray, ray_address
    from imm_ray.serve.deploy import start_serving

    settings, run_dir = settings_from_cli(args)
    on_cluster = ray_address(args.ray_address) is not None
    connect_ray(args.ray_address, namespace="serve")  # before anything else imports Ray

    import ray
    from ray import serve

    if on_cluster:
        start_serving(run_dir, settings)
        logger.info("deployed Serve application %r on the cluster; it outlives this command "
                    "(`serve status` shows it, `serve shutdown` stops Serve)", settings.app_name)
        ray.shutdown()  # disconnects this driver only
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serving(run_dir, settings)
        logger.info("serving %s at http://%s:%d/v1, its web page at http://%s:%d/ (Ctrl-C to stop)", run_dir,
                    settings.host, settings.port, settings.host, settings.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
