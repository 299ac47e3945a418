"""One typed configuration tree for a run, with named presets and ``a.b=c`` overrides.

A config is built in layers: the defaults of the pydantic models, then an optional named preset
(``preset: paper`` in the YAML or ``--preset``), then the YAML file, then command-line overrides.
The resolved tree is saved as ``run.yaml`` in the run directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imm_ray.data import DatasetSpec
from imm_ray.serve.settings import ServeSettings
from imm_ray.train import SFTSettings


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model the run starts from."""

    ref: str = "embedded:smollm2-135m-instruct"
    # Distillation: a (stronger) teacher writes the training data every round; the student
    # (``ref``) is fine-tuned and merged with its own original weights.
    teacher: str | None = None
    cache_dir: str | None = None


class ActorResources(_Strict):
    """Ray resources for one actor or task."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


class DataConfig(_Strict):
    """Problem sets: the ID training pool and the evaluation sets (first = in-domain)."""

    dir: str | None = None
    train: DatasetSpec = DatasetSpec(name="gsm8k-train", preset="gsm8k", split="train")
    eval: list[DatasetSpec] = Field(
        default_factory=lambda: [
            DatasetSpec(name="gsm8k", preset="gsm8k", split="test"),
            DatasetSpec(name="svamp", preset="svamp", split="test"),
            DatasetSpec(name="asdiv", preset="asdiv", split="test"),
        ]
    )
    prompt_template: str = "chat"
    system_prompt: str | None = None
    instruction_suffix: str | None = None

    @field_validator("eval")
    @classmethod
    def _unique_names(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval names must be unique, got {names}")
        return v


class EngineConfig(_Strict):
    """The inference engine used by generator actors (generation and evaluation)."""

    name: str = "vllm"
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gb: float = 2.0
    batch_size: int = 16
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85


class GenerateConfig(_Strict):
    """Rejection-sampling generation on the ID training pool."""

    engine: EngineConfig = EngineConfig()
    num_actors: int = Field(1, ge=1)
    resources: ActorResources = ActorResources()
    samples_per_question: int = Field(4, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] | None = None
    seed: int = 0
    chunk_size: int = Field(32, ge=1)
    # Collapse metric: per-token entropy of the model's next-token distribution over its top-k
    # tokens (renormalised), averaged per round; 0 turns it off.
    entropy_top_k: int = Field(20, ge=0)


class VerifyConfig(_Strict):
    """Which verifier keeps samples, and whether identical texts are deduplicated."""

    verifier: str = "numeric"
    dedup: bool = True
    batch_size: int = Field(512, ge=1)
    resources: ActorResources = ActorResources(num_cpus=0.5)


class MergeConfig(_Strict):
    """The merge after each round's SFT (arm ``imm``)."""

    method: str = "imm"
    params: dict[str, Any] = Field(default_factory=lambda: {"lam": 0.5, "drop_rate": 0.2})
    seed: int = 0
    anchor: str = "original"
    resources: ActorResources = ActorResources()


class EvalConfig(_Strict):
    """Greedy evaluation of every round's model on the eval sets."""

    max_tokens: int = Field(512, ge=1)
    baseline: bool = True
    # auto: numeric when every gold answer of a set is a number, math-verify otherwise (MATH-500).
    verifier: str = "auto"


class RayConfig(_Strict):
    """How the driver reaches Ray: an address, or a local head started in-process."""

    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False


class RunSettings(_Strict):
    """The loop itself."""

    name: str = "imm"
    rounds: int = Field(2, ge=1)
    # imm: SFT the current model, merge with the original. si: SFT the current model, no merge.
    # rest: ReST-EM/STaR style, SFT the ORIGINAL model on data the current model wrote.
    arms: list[Literal["imm", "si", "rest"]] = Field(default_factory=lambda: ["imm"])
    progress: bool = True
    report: bool = True  # write report.md + plots/ at the end of every run
    analyze: bool = False  # layer analysis (parameter change vs importance) at the end of the run
    analyze_probe_size: int = Field(16, ge=1)
    metric_sinks: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)

    @field_validator("arms")
    @classmethod
    def _arms_unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"run.arms must be a non-empty list without repeats, got {v}")
        return v


class ImmConfig(_Strict):
    """The whole configuration tree of an IMM run."""

    preset: str | None = None
    run: RunSettings = RunSettings()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generate: GenerateConfig = GenerateConfig()
    verify: VerifyConfig = VerifyConfig()
    train: SFTSettings = SFTSettings()
    merge: MergeConfig = MergeConfig()
    evaluate: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _check(self) -> "ImmConfig":
        if not self.data.eval:
            raise ValueError("data.eval needs at least one data set (the first is the in-domain test set)")
        return self


# Named presets: partial trees applied under the YAML file.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' settings (Yuan et al. 2025, merge_syn scripts + MergeLM DARE).
    "paper": {
        "run": {"rounds": 3, "arms": ["imm", "si"]},
        "data": {"prompt_template": "alpaca"},
        "generate": {"samples_per_question": 3, "temperature": 0.0, "max_tokens": 512},
        "train": {
            "epochs": 3,
            "lr": 2e-5,
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "lr_scheduler": "cosine",
            "effective_batch_size": 64,
            "max_length": 512,
            "precision": "bf16",
        },
        "merge": {"method": "imm", "params": {"lam": 0.5, "drop_rate": 0.2}, "seed": 0},
        "evaluate": {"max_tokens": 512},
    },
    # Small and fast: a CPU machine with 2 cores.
    "cpu-small": {
        "generate": {"max_tokens": 320, "engine": {"kv_cache_gb": 2.0, "max_model_len": 1024}},
        "train": {"micro_batch_size": 4, "effective_batch_size": 16, "max_length": 512, "epochs": 2},
        "evaluate": {"max_tokens": 320},
    },
}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``top`` (dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML.

    Integer path parts index into lists (``data.eval.0.limit=10``).
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    path, raw = override.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {override!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        node = _child(node, key, keys[: i + 1], create=True)
    last = keys[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, keys)
        node[idx] = value
    else:
        node[last] = value


def _list_index(node: list[Any], key: str, keys: list[str]) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"override path {'.'.join(keys)}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _child(node: Any, key: str, keys: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, keys)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {'.'.join(keys)} goes through a value that is not a mapping")
    if key not in node or node[key] is None:
        if not create:
            raise ConfigError(f"unknown config key {'.'.join(keys)}")
        node[key] = {}
    return node[key]


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> ImmConfig:
    """Build the resolved config from defaults, a preset, a YAML file and overrides."""
    file_tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        file_tree = loaded or {}
    for override in overrides or []:
        apply_override(file_tree, override)
    preset_name = preset or file_tree.get("preset")
    tree: dict[str, Any] = {}
    if preset_name:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown preset {preset_name!r}; known presets: {sorted(PRESETS)}")
        tree = deep_merge(PRESETS[preset_name], {"preset": preset_name})
    tree = deep_merge(tree, file_tree)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> ImmConfig:
    """Validate a plain tree into an :class:`ImmConfig`, with errors that name the key."""
    try:
        return ImmConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc


def config_to_yaml(cfg: ImmConfig) -> str:
    """Serialise the resolved config (the form saved as ``run.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that may change when a run is resumed: they do not change what finished stages produced.
RESUMABLE_CHANGES = (
    "run.rounds", "run.progress", "run.report", "run.analyze", "run.metric_sinks", "ray.", "serve.",
    "generate.num_actors", "generate.chunk_size", "generate.entropy_top_k",
)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """List dotted keys whose values differ between two config trees."""
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, dotted + "."))
        elif a != b:
            diffs.append(dotted)
    return diffs
