"""What the storage layer costs per checkpoint: publish and materialize, local disk vs S3 on loopback.

    flock /tmp/imm-slow.lock .venv/bin/python tests/bench/bench_storage.py [--model FOLDER] [--repeat 3] [--merge]

``--merge`` times the merge task's body instead (materialize the inputs, merge, publish; a cold node
cache each time), with the inputs and output on a local disk and on S3, as the task runs now (each
weight file hashed once) and as it ran before (the provenance and the manifest hashing again).

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


def _merge_hashing_twice(anchor: str, sft: str, out: str) -> None:
    """The merge task's body as it was before the merge reused known digests (for comparison)."""
    from imm_ray.merge import MergeOptions, merge_checkpoints
    from imm_ray.storage import materialize, publish_dir, resolve, work_dir_for

    work = work_dir_for(out)
    try:
        merged = merge_checkpoints(str(materialize(anchor)), [str(materialize(sft))], str(work / "merged"),
                                   MergeOptions(params={"lam": 0.5, "drop_rate": 0.2}, fsync=True), progress=False)
        publish_dir(merged, resolve(out), move=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench_merge(src: Path, work: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds of the merge task's body, now and before, with its run directory local and on S3."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from imm_ray.loop.remote import merge_task
    from imm_ray.storage import StorageOptions, delete, publish_dir, resolve

    sft = work / "sft-src"
    shutil.copytree(src, sft)
    rng = np.random.default_rng(0)
    for f in sft.glob("*.safetensors"):
        tensors = {k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    results: dict[str, list[float]] = {}
    for root in (str(work / "run"), "s3://bench/merge-run"):
        where = "s3" if root.startswith("s3://") else "local"
        anchor, tuned = f"{root}/original", f"{root}/imm/round-001/sft"
        publish_dir(src, anchor)
        publish_dir(sft, tuned)
        for i in range(repeat):
            for variant, body in (("now", lambda a, t, o: merge_task._function("imm", a, [t], o, {"lam": 0.5,
                                   "drop_rate": 0.2}, 0, StorageOptions())), ("before", _merge_hashing_twice)):
                os.environ["IMM_NODE_CACHE_DIR"] = str(work / f"cache-{where}-{variant}-{i}")  # a cold node cache
                out = f"{root}/imm/round-001/merged-{variant}-{i}"
                results.setdefault(f"merge_{where}_{variant}", []).append(
                    _timed(lambda: body(anchor, tuned, out)))  # noqa: B023
                delete(resolve(out))
                shutil.rmtree(os.environ["IMM_NODE_CACHE_DIR"], ignore_errors=True)
    return results


def main() -> int:
    from imm_ray.storage import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_cache_dir() / "models" / "smollm2-135m-instruct-0.1.2-fp32"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--merge", action="store_true", help="time the merge task's body instead (see above)")
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
    os.environ["IMM_SCRATCH_DIR"] = str(work / "scratch")
    try:
        if args.merge:
            results = _bench_merge(src, work, args.repeat)
        for i in range(0 if args.merge else args.repeat):
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
