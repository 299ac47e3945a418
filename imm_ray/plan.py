"""`imm plan`: estimated memory per worker of every stage, before renting GPUs (pure: no torch or Ray).

Model sizes come from the model's ``config.json`` (an embedded model or a local folder), or for hub
ids without a local copy from `KNOWN_MODELS`. Per SFT worker (P parameters, N workers):

* ``ddp``: fp32 weights 4P, gradients 4P, AdamW moments 8P, DDP's gradient buckets 4P (N > 1) and
  bf16 autocast's weight copies 2P;
* ``fsdp``: the fp32 shards of weights, gradients and moments, 16P/N, plus the layers gathered
  whole in the training dtype (the root's embeddings and head, two decoder layers and their
  gradients at a time);
* activations for one micro-batch of ``micro_batch_size x max_length`` tokens (an upper bound:
  a packed row is as long as the step's longest example): per layer and token, the tensors a
  Llama/Qwen block keeps for backward (about 10 hidden + 4 intermediate + 4 KV widths), only the
  layer inputs with activation checkpointing; plus the logits of every position (12 bytes a
  vocabulary entry in fp32, 16 with bf16: logits, log-softmax and its gradient);
* the runtime: `RUNTIME_GB` (on a CPU: torch, transformers and the Ray Train worker measured
  0.57 GiB before the model loads in ``make bench-sft``, plus allocator slack; on a GPU: the CUDA
  context and allocator slack, an assumption never measured).

An inference engine holds its weights in its dtype and a KV cache: on a GPU vLLM takes
``gpu_memory_utilization`` of it (the check is that weights plus one full-length sequence's KV fit
inside), on a CPU ``kv_cache_gb``. A Serve replica holds ``resident_models + spare_engines`` engines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imm_ray.errors import UserError
from imm_ray.serve.settings import GPU_SHARE_LIMIT, engines_gpu_share

GIB = 1024**3
# Process memory besides the model (GiB) by device: see the module docstring.
RUNTIME_GB = {"cpu": 0.75, "gpu": 1.0}

# config.json numbers of hub models a plan may meet without a local copy (copied from each model's
# config.json on huggingface.co, Qwen/Qwen2.5-*-Instruct; the base models have the same shapes):
# vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, tie_word_embeddings. Qwen2 (model_type qwen2) has q/k/v biases.
_QWEN2_SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": (151936, 896, 4864, 24, 14, 2, True),
    "Qwen/Qwen2.5-1.5B-Instruct": (151936, 1536, 8960, 28, 12, 2, True),
    "Qwen/Qwen2.5-3B-Instruct": (151936, 2048, 11008, 36, 16, 2, True),
    "Qwen/Qwen2.5-7B-Instruct": (152064, 3584, 18944, 28, 28, 4, False),
}
_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings")
KNOWN_MODELS: dict[str, dict[str, Any]] = {name: {**dict(zip(_CONFIG_KEYS, shape)), "model_type": "qwen2"}
                                           for name, shape in _QWEN2_SHAPES.items()}


@dataclass(frozen=True)
class ModelDims:
    """The shapes of a Llama/Qwen-style decoder that set its memory."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        """From a Hugging Face ``config.json`` mapping."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(vocab=int(config["vocab_size"]), hidden=int(config["hidden_size"]),
                       intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       qkv_bias=bool(config.get("attention_bias")) or config.get("model_type") == "qwen2")
        except KeyError as exc:
            raise UserError(f"model config.json lacks {exc.args[0]}: imm plan needs a Llama/Qwen-style "
                            "decoder config") from None

    @property
    def kv_width(self) -> int:
        """Width of one of K or V (kv heads x head dim)."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, SwiGLU MLP, two norms)."""
        h, kv = self.hidden, self.kv_width
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, an untied LM head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        """All parameters."""
        return self.layers * self.layer_params + self.root_params


def model_dims(ref: str, cache_dir: str | None = None) -> ModelDims:
    """The shapes of ``ref``: its config.json (embedded or local folder), else `KNOWN_MODELS`."""
    if ref in KNOWN_MODELS:
        return ModelDims.from_config(KNOWN_MODELS[ref])
    if ref.startswith("embedded:") or Path(ref).expanduser().is_dir():
        from imm_ray.models import resolve_model

        path = resolve_model(ref, cache_dir) / "config.json"
        return ModelDims.from_config(json.loads(path.read_text(encoding="utf-8")))
    raise UserError(f"imm plan: no local config.json for model {ref!r} and not one of "
                    f"{', '.join(KNOWN_MODELS)}: give model.ref as a local folder")


@dataclass
class Estimate:
    """One stage's estimated memory per worker (GiB by part) and where it runs."""

    stage: str
    device: str  # "gpu" or "cpu"
    workers: int
    parts: dict[str, float]
    capacity_gb: float
    node_type: str
    strategy: str = ""
    note: str = ""
    extra_ok: bool = True  # a check besides the total (Serve's GPU share)
    total_gb: float = field(init=False)

    def __post_init__(self) -> None:
        self.total_gb = sum(self.parts.values())

    @property
    def fits(self) -> bool:
        """Whether the total stays within the worker's memory."""
        return self.extra_ok and self.total_gb <= self.capacity_gb


def sft_parts(dims: ModelDims, strategy: str, workers: int, micro_batch_size: int,
              max_length: int, bf16: bool, checkpointing: bool, device: str) -> dict[str, float]:
    """GiB per SFT worker by part (see the module docstring for the terms)."""
    p, act_bytes = dims.params, (2 if bf16 else 4)
    if strategy == "fsdp":
        gathered = (dims.root_params + 4 * dims.layer_params) * act_bytes  # 2 layers + their grads
        parts = {"weights": 4 * p / workers + gathered, "grads": 4 * p / workers,
                 "optimizer": 8 * p / workers}
    else:
        parts = {"weights": 4 * p + (2 * p if bf16 else 0), "grads": 4 * p * (2 if workers > 1 else 1),
                 "optimizer": 8 * p}
    tokens = micro_batch_size * max_length
    per_layer = (dims.hidden if checkpointing
                 else 10 * dims.hidden + 4 * dims.intermediate + 4 * dims.kv_width)
    recompute = (10 * dims.hidden + 4 * dims.intermediate) if checkpointing else 0
    parts["activations"] = tokens * ((dims.layers * per_layer + recompute) * act_bytes
                                     + dims.vocab * (16 if bf16 else 12))
    parts["runtime"] = RUNTIME_GB[device] * GIB
    return {k: v / GIB for k, v in parts.items()}


def engine_parts(dims: ModelDims, engine: Any, gpu_gb: float, device: str,
                 cpu_bf16: bool) -> dict[str, float]:
    """GiB of one inference engine (EngineSettings ``engine``): weights, KV cache (CPU:
    kv_cache_gb; GPU: what is left of its share, at least one full-length sequence), runtime.
    bfloat16 runs in float32 on a CPU without bf16 instructions (`imm_ray.devices.engine_dtype`)."""
    half = engine.dtype in ("bfloat16", "bf16", "float16", "half", "auto")
    wbytes = 2 if half and (device == "gpu" or cpu_bf16) else 4
    max_model_len, gpu_memory_utilization = engine.max_model_len, engine.gpu_memory_utilization
    weights = dims.params * wbytes / GIB
    one_sequence = 2 * dims.layers * dims.kv_width * wbytes * max_model_len / GIB
    if device == "gpu":
        kv = max(gpu_memory_utilization * gpu_gb - weights, one_sequence)
    else:
        kv = engine.kv_cache_gb
    return {"weights": weights, "kv_cache": kv, "runtime": RUNTIME_GB[device]}


def node_type_for(request: dict[str, float], node_types: dict[str, dict[str, float]]) -> str:
    """The first declared node type that offers ``request``; "any" when none are declared."""
    if not node_types:
        return "any"
    for name, offers in node_types.items():
        if all(offers.get(key, 0.0) >= amount for key, amount in request.items() if amount > 0):
            return name
    return "none offers " + ", ".join(f"{k}={v:g}" for k, v in request.items() if v > 0)


def plan_stages(cfg: Any, dims: ModelDims, gpu_gb: float, host_gb: float,
                cpu_bf16: bool) -> list[Estimate]:
    """Estimates for SFT (ddp and fsdp), generation/evaluation, merge and Serve of config ``cfg``
    (an ImmConfig), with ``gpu_gb`` per GPU and ``host_gb`` per node."""
    node_types = {name: t.resources for name, t in cfg.ray.node_types.items()}
    train = cfg.train
    device = "gpu" if train.use_gpu else "cpu"
    bf16 = train.precision == "bf16" or (train.precision == "auto" and (train.use_gpu or cpu_bf16))
    capacity = gpu_gb if train.use_gpu else host_gb
    sft_node = node_type_for(train.worker_resources(), node_types)
    estimates = [Estimate("sft", device, train.num_workers,
                          sft_parts(dims, strategy, train.num_workers, train.micro_batch_size,
                                    train.max_length, bf16, train.activation_checkpointing, device),
                          capacity, sft_node, strategy=strategy,
                          note=f"each worker first loads the whole model: {4 * dims.params / GIB:.1f} GiB "
                               "of host memory")
                 for strategy in ("ddp", "fsdp")]

    gen = cfg.generate
    gen_device = "gpu" if gen.resources.num_gpus > 0 else "cpu"
    gen_parts = engine_parts(dims, gen.engine, gpu_gb, gen_device, cpu_bf16)
    gen_request = {"CPU": gen.resources.num_cpus, "GPU": gen.resources.num_gpus,
                   **gen.resources.resources}
    estimates.append(Estimate("generate+evaluate", gen_device, gen.num_actors, gen_parts,
                              gpu_gb if gen_device == "gpu" else host_gb,
                              node_type_for(gen_request, node_types)))

    merge = cfg.merge.resources
    # The merge engine streams (imm_ray/merge/engine.py): elementwise methods hold a few blocks per thread,
    # the others a few fp32 copies of the largest tensor (the embedding); 4 copies is the bound used.
    largest = max(dims.vocab, dims.intermediate) * dims.hidden * 4 / GIB
    estimates.append(Estimate("merge", "cpu", 1,
                              {"tensors": 4 * largest, "runtime": RUNTIME_GB["cpu"]},
                              host_gb, node_type_for({"CPU": merge.num_cpus, **merge.resources},
                                                     node_types),
                              note="streamed tensor by tensor: 4 fp32 copies of the largest tensor at most"))

    serve = cfg.serve
    serve_device = "gpu" if serve.num_gpus > 0 else "cpu"
    engines = serve.resident_models + serve.spare_engines
    one = engine_parts(dims, serve.engine, gpu_gb, serve_device, cpu_bf16)
    share = engines_gpu_share(serve)
    serve_parts = ({"engines": share * gpu_gb, "runtime": one["runtime"]} if serve_device == "gpu"
                   else {"weights": one["weights"] * engines, "kv_cache": one["kv_cache"] * engines,
                         "runtime": one["runtime"]})
    estimates.append(Estimate(
        "serve", serve_device, serve.num_replicas, serve_parts,
        gpu_gb if serve_device == "gpu" else host_gb,
        node_type_for({"CPU": serve.num_cpus, "GPU": serve.num_gpus}, node_types),
        note=f"{engines} engines" + (f", GPU share {share:.2f}" if serve_device == "gpu" else ""),
        extra_ok=serve_device != "gpu" or share <= GPU_SHARE_LIMIT * min(serve.num_gpus, 1.0)))
    return estimates


def format_plan(estimates: list[Estimate], dims: ModelDims, model: str) -> str:
    """The plan as an aligned text table, one line per stage (and strategy)."""
    lines = [f"model {model}: {dims.params / 1e9:.3f}B parameters, {dims.layers} layers",
             f"{'stage':<18} {'strategy':<8} {'device':<6} {'workers':>7} {'total GiB':>9} "
             f"{'capacity':>8}  {'fits':<4} {'node type':<14} parts (GiB)"]
    for e in estimates:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in e.parts.items())
        note = f"; {e.note}" if e.note else ""
        lines.append(f"{e.stage:<18} {e.strategy or '-':<8} {e.device:<6} {e.workers:>7} "
                     f"{e.total_gb:>9.2f} {e.capacity_gb:>8.1f}  {'yes' if e.fits else 'NO':<4} "
                     f"{e.node_type:<14} {parts}{note}")
    return "\n".join(lines) + "\n"
