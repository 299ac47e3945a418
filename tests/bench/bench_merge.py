"""Benchmark: imm_ray.merge against mergekit 0.1.5 and the I/O floor (``make bench-merge``).

Builds two synthetic bf16 checkpoints with Qwen2.5-0.5B's tensor names and shapes (494M parameters,
tied embeddings, 2 shards each), then times, alternately and ``--repeats`` times, as subprocesses:
this engine (CLI), ``mergekit-yaml`` (installed into its own venv, reused across runs from
``--mergekit-venv``) and a plain copy of the input bytes (read the base, copy the model: the floor).
Prints one JSON line per method with medians of wall time and peak RSS (``os.wait4``) and ratios.

``ours_s`` runs the CLI without provenance checksums (mergekit computes none); ``ours_sha256_s`` is
the default configuration, which also hashes every input and output weight file with sha256;
``ours_merge_only_s`` is the time inside ``merge_checkpoints`` (no interpreter/torch start-up).
The parent process imports neither torch nor numpy (the checkpoints are built in a child), so the
children's peak RSS is their own (Linux keeps ``ru_maxrss`` across fork + exec).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 896, 4864, 24, 151936, 14, 2
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
    "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
}
METHODS = ("linear", "task_arithmetic", "dare_linear")


def qwen_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Qwen2.5-0.5B (tied embeddings: no lm_head.weight)."""
    kv = HIDDEN // HEADS * KV_HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
            p + "self_attn.k_proj.weight": (kv, HIDDEN), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return shapes


def random_bf16(shape: tuple[int, ...], rng, scale_exp: int):
    """Fast random bf16 (random sign and mantissa, exponent in 2**scale_exp .. 2**(scale_exp+3))."""
    import numpy as np
    import torch

    n = int(np.prod(shape))
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits = (bits & np.uint16(0x81FF)) | np.uint16((127 + scale_exp) << 7)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)


def build_checkpoint(folder: Path, seed: int, base: Path | None = None) -> Path:
    """Random bf16 weights (or ``base`` + small noise), 2 shards with an index, config files."""
    import numpy as np
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = sorted(qwen_shapes().items())
    half = len(names) // 2
    weight_map = {}
    for part, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-{part + 1:05d}-of-00002.safetensors"
        tensors = {}
        for name, shape in chunk:
            tensors[name] = random_bf16(shape, rng, -7 if base is None else -12)
            weight_map[name] = fname
        if base is not None:
            from safetensors import safe_open

            with safe_open(str(base / fname), framework="pt") as fh:
                for name in tensors:
                    tensors[name] = fh.get_tensor(name).add_(tensors[name])
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    total = sum(2 * _numel(s) for s in qwen_shapes().values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(QWEN_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ensure_mergekit(venv: Path) -> Path:
    """``mergekit-yaml`` from its own venv (created with pip on first use)."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"# installing mergekit into {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"], check=True)
    return exe


def mergekit_yaml(method: str, base: Path, model: Path) -> str:
    lines = [f"merge_method: {method}", "dtype: bfloat16", "models:"]
    if method == "linear":
        lines += [f"  - model: {base}", "    parameters: {weight: 0.5}",
                  f"  - model: {model}", "    parameters: {weight: 0.5}"]
    else:
        density = ", density: 0.8" if method == "dare_linear" else ""
        lines += [f"  - model: {model}", f"    parameters: {{weight: 0.5{density}}}",
                  f"base_model: {base}", "parameters: {normalize: false}"]
    return "\n".join(lines) + "\n"


OURS = (
    "import sys,time\n"
    "from imm_ray.merge import cli\n"
    "t=time.perf_counter(); rc=cli.main(sys.argv[1:]); print('MERGE_S', time.perf_counter()-t)\n"
    "sys.exit(rc)\n"
)


def ours_cmd(method: str, base: Path, model: Path, out: Path, checksums: bool) -> list[str]:
    cmd = [sys.executable, "-c", OURS, "--method", method, "--base", str(base), "--no-progress", "--out", str(out)]
    if method == "linear":
        cmd += ["--model", str(base), str(model), "--weight", "0.5", "0.5"]
    elif method == "task_arithmetic":
        cmd += ["--model", str(model), "--lambda", "0.5"]
    else:
        cmd += ["--model", str(model), "--weight", "0.5", "--drop-rate", "0.2"]
    return cmd + ([] if checksums else ["--no-checksums"])


FLOOR = (
    "import shutil,sys,pathlib\n"
    "b,m,o=map(pathlib.Path,sys.argv[1:]);o.mkdir()\n"
    "for f in sorted(b.glob('*.safetensors')):\n"
    "    with open(f,'rb') as fh:\n"
    "        while fh.read(1<<24): pass\n"
    "for f in sorted(m.glob('*.safetensors')): shutil.copyfile(f,o/f.name)\n"
)


def timed(cmd: list[str], out: Path) -> tuple[float, float, float | None]:
    """Run ``cmd``; return (wall s, peak RSS MB of the child, in-process merge s if printed);
    removes ``out`` afterwards."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(errors="replace"), se.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    inner = [float(line.split()[1]) for line in stdout.splitlines() if line.startswith("MERGE_S ")]
    return wall, usage.ru_maxrss / 1024.0, inner[0] if inner else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temp dir)")
    ap.add_argument("--mergekit-venv", default=str(Path.home() / ".cache" / "imm_ray" / "mergekit-venv"))
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit (ours and the floor only)")
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # child mode: build checkpoints only
    args = ap.parse_args()
    if args.build:
        base = build_checkpoint(Path(args.build) / "base", seed=0)
        build_checkpoint(Path(args.build) / "model", seed=1, base=base)
        return 0

    mergekit = None if args.no_mergekit else ensure_mergekit(Path(args.mergekit_venv))
    root = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(root)], check=True)
        base, model = root / "base", root / "model"
        print(f"# built 2 checkpoints in {time.perf_counter() - t0:.1f}s under {root}", file=sys.stderr, flush=True)
        out = root / "out"
        timed([sys.executable, "-c", FLOOR, str(base), str(model), str(out)], out)  # warm the page cache
        for method in args.methods:
            cfg = root / f"{method}.yml"
            cfg.write_text(mergekit_yaml(method, base, model))
            contenders = {
                "ours": ours_cmd(method, base, model, out, checksums=False),
                "ours_sha256": ours_cmd(method, base, model, out, checksums=True),
                "floor": [sys.executable, "-c", FLOOR, str(base), str(model), str(out)],
            }
            if mergekit is not None:
                contenders["mergekit"] = [str(mergekit), str(cfg), str(out), "--no-write-model-card"]
            runs: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in contenders}
            for _ in range(args.repeats):
                for name, cmd in contenders.items():
                    runs[name].append(timed(cmd, out))
            med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
            row = {
                "method": method,
                "ours_s": round(med["ours"][0], 3),
                "mergekit_s": round(med["mergekit"][0], 3) if mergekit else None,
                "floor_s": round(med["floor"][0], 3),
                "ours_rss_mb": round(med["ours"][1], 1),
                "mergekit_rss_mb": round(med["mergekit"][1], 1) if mergekit else None,
                "ours_sha256_s": round(med["ours_sha256"][0], 3),
                "ours_merge_only_s": round(statistics.median(x[2] for x in runs["ours"]), 3),
                "ours_over_floor": round(med["ours"][0] / med["floor"][0], 2),
                "repeats": args.repeats,
            }
            if mergekit:
                row["time_ratio"] = round(med["ours"][0] / med["mergekit"][0], 3)
                row["rss_ratio"] = round(med["ours"][1] / med["mergekit"][1], 3)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
