"""Entry point of the OpenAI-compatible Ray Serve app over a run's merged checkpoints.

    serve run services.app:app run_dir=runs/demo [host=127.0.0.1] [port=8000] [engine=hf] [key=value ...]

or, in a Serve config file (``serve deploy``, a KubeRay RayService's ``serveConfigV2``)::

    applications:
      - name: imm
        import_path: services.app:app
        args: {run_dir: /data/runs/demo, engine: vllm}

(for a local head export ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` first (see imm_ray/ray_env.py), or
point ``RAY_ADDRESS`` at a running cluster). ``imm serve`` is the same app behind the ``imm``
command. The app itself lives in :mod:`imm_ray.serve.deploy` and :mod:`imm_ray.serve.deployment`.
"""

from imm_ray.serve.deploy import app_builder as app

__all__ = ["app"]
