"""What the storage layer costs per checkpoint: publish and materialize, local disk vs S3 on loopback.

    flock /tmp/imm-slow.lock .venv/bin/python tests/bench/bench_storage.py [--model FOLDER] [--repeat 3]

The S3 server is moto's server mode on 127.0.0.1 (in-memory: it measures the protocol, hashing
and copies, not a network). Default model: the converted SmolLM2-135M in the imm-ray cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_storage")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    from imm_ray.storage import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_cache_dir() / "models" / "smollm2-135m-instruct-0.1.2-fp32"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": endpoint})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

    from imm_ray.storage import delete, materialize, publish_dir, resolve

    src = Path(args.model)
    size_mb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 2**20
    results: dict[str, list[float]] = {"local_publish": [], "s3_publish": [], "s3_materialize_cold": [],
                                       "s3_materialize_warm": []}
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        for i in range(args.repeat):
            local = work / f"local-{i}"
            results["local_publish"].append(_timed(lambda: publish_dir(src, local)))  # noqa: B023
            dest = resolve(f"s3://bench/run/ck-{i}")
            results["s3_publish"].append(_timed(lambda: publish_dir(src, dest)))  # noqa: B023
            cache = work / f"cache-{i}"
            results["s3_materialize_cold"].append(_timed(lambda: materialize(dest, cache_dir=cache)))  # noqa: B023
            results["s3_materialize_warm"].append(_timed(lambda: materialize(dest, cache_dir=cache)))  # noqa: B023
            shutil.rmtree(local)
            shutil.rmtree(cache)
            delete(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()
    summary = {"model": str(src), "size_mb": round(size_mb, 1), "repeat": args.repeat,
               **{k: round(statistics.median(v), 3) for k, v in results.items()}}
    logger.info("%s", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
