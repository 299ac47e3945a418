"""One typed configuration tree for a run, with named presets and ``a.b=c`` overrides.

A config is built in layers: the defaults of the pydantic models, then an optional named preset
(``preset: paper`` in the YAML or ``--preset``), then the YAML file, then command-line overrides.
The resolved tree is saved as ``run.yaml`` in the run directory.
"""

from __future__ import annotations

import copy
import difflib
import logging
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from imm_ray.data import DatasetSpec
from imm_ray.errors import UserError, unknown_name
from imm_ray.generate.settings import EngineSettings
from imm_ray.placement import custom_resources
from imm_ray.serve.settings import ServeSettings
from imm_ray.train import SFTSettings

logger = logging.getLogger(__name__)

# Keys that no longer do anything: an old run.yaml or config file that sets one still loads (the key
# is dropped with a warning), and a resume never refuses a change to one.
REMOVED_KEYS: dict[str, str] = {
    "generate.chunk_size": "each generator streams all its prompts through its engine at once",
}


class ConfigError(UserError, ValueError):
    """The configuration is invalid; the message says which key and how to fix it."""


def _known(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is one of ``known``; else a ValueError listing them (a pydantic validator's error)."""
    known = set(known)
    if name not in known:
        raise ValueError(unknown_name(kind, name, known))
    return name


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
    # Custom Ray resources, e.g. {node_1: 0.01} to pin the stage to the node that offers node_1.
    resources: dict[str, float] = {}

    @field_validator("resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v)


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

    @field_validator("prompt_template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from imm_ray.data.prompts import PROMPT_TEMPLATES

        return _known("prompt template", v, PROMPT_TEMPLATES)

    @field_validator("train", "eval")
    @classmethod
    def _known_presets(cls, v: DatasetSpec | list[DatasetSpec]) -> DatasetSpec | list[DatasetSpec]:
        from imm_ray.data.presets import DATASET_PRESETS

        for spec in v if isinstance(v, list) else [v]:
            if spec.preset is not None and spec.preset not in DATASET_PRESETS:
                known = unknown_name("dataset preset", spec.preset, DATASET_PRESETS)
                raise ValueError(f"data set {spec.name!r}: {known}")
        return v

    @field_validator("eval")
    @classmethod
    def _unique_names(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"data.eval names must be unique, got {names}")
        return v


class GenerateConfig(_Strict):
    """Rejection-sampling generation on the ID training pool."""

    engine: EngineSettings = EngineSettings()  # the one engine-settings model (imm_ray.generate.settings)
    num_actors: int = Field(1, ge=1)
    resources: ActorResources = ActorResources()
    samples_per_question: int = Field(4, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    stop: list[str] | None = None
    seed: int = 0
    # Collapse metric: per-token entropy of the model's next-token distribution over its top-k
    # tokens (renormalised), averaged per round; 0 turns it off.
    entropy_top_k: int = Field(20, ge=0)
    # It is measured on every entropy_stride-th training question only (1: all): a sample of the
    # questions estimates the round's mean (within 2% of all questions' on GSM8K) for less work.
    entropy_stride: int = Field(4, ge=1)


class VerifyConfig(_Strict):
    """Which verifier keeps samples, and whether identical texts are deduplicated."""

    verifier: str = "numeric"
    dedup: bool = True
    batch_size: int = Field(512, ge=1)
    resources: ActorResources = ActorResources(num_cpus=0.5)

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, v: str) -> str:
        from imm_ray.verify import VERIFIERS

        return _known("verifier", v, VERIFIERS)


_DEFAULT_MERGE_PARAMS = {"lam": 0.5, "drop_rate": 0.2}  # the paper's IMM merge


class MergeConfig(_Strict):
    """The merge after each round's SFT (arm ``imm``)."""

    method: str = "imm"
    # Checked against the method's parameters even when left at the default (the imm method's).
    params: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_MERGE_PARAMS), validate_default=True)
    seed: int = 0
    anchor: str = "original"
    resources: ActorResources = ActorResources()

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from imm_ray.merge.methods import MERGE_METHODS

        return _known("merge method", v, MERGE_METHODS)

    @field_validator("params")
    @classmethod
    def _valid_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Check the parameters against the method's typed specs (the loop merges one model into the
        anchor); kept as written, so that run.yaml compares them as the user wrote them."""
        from imm_ray.merge import MergeError, get_merge_method

        if "method" in info.data:  # an unknown method is reported by itself
            try:
                get_merge_method(info.data["method"]).validate(v, n_models=1)
            except MergeError as exc:
                hint = " (the default merge.params are the imm method's: set merge.params too)"
                raise ValueError(f"{exc}{hint if v == _DEFAULT_MERGE_PARAMS else ''}") from None
        return v


class EvalConfig(_Strict):
    """Greedy evaluation of every round's model on the eval sets."""

    max_tokens: int = Field(512, ge=1)
    baseline: bool = True
    # auto: numeric when every gold answer of a set is a number, math-verify otherwise (MATH-500).
    verifier: str = "auto"

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, v: str) -> str:
        from imm_ray.verify import VERIFIERS

        return _known("evaluation verifier", v, ["auto", *VERIFIERS])


class StorageConfig(_Strict):
    """Object storage for s3:// run directories; unset keys come from the AWS environment variables."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, moto, ...)
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION
    lease_ttl_s: float = Field(60.0, ge=3)  # a SIGKILLed driver's run lease expires after this
    node_cache_gb: float = Field(200.0, gt=0)
    """Bound of each node's cache of checkpoints (GB); the least recently used ones no process holds go first."""


class RayConfig(_Strict):
    """How the driver reaches Ray (an address, or a local head started in-process) and waits for resources."""

    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False
    # While actors wait for resources (e.g. for the autoscaler to add a node), log what is pending
    # every placement_log_s; give up after placement_timeout_s (None: wait for ever).
    placement_log_s: float = Field(60.0, gt=0)
    placement_timeout_s: float | None = Field(None, gt=0)


class RunSettings(_Strict):
    """The loop itself."""

    name: str = "imm"
    rounds: int = Field(2, ge=1)
    # imm, si, rest: what each does (SFT from the current or the original model, merge or not) is the
    # table imm_ray.loop.arms.ARMS.
    arms: list[str] = Field(default_factory=lambda: ["imm"])
    # Arms run at once, each with its own generator pool and SFT, when the cluster holds them all
    # (sized from the resource requests); 1: one after another; 0: as many as fit.
    concurrent_arms: int = Field(1, ge=0)
    progress: bool = True
    report: bool = True  # write report.md + plots/ at the end of every run
    analyze: bool = False  # layer analysis (parameter change vs importance) at the end of the run
    analyze_probe_size: int = Field(16, ge=1)
    metric_sinks: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v or v.startswith("~") or "\0" in v:
            raise ValueError(f"run.name must be a plain folder name (no '/', '..', '~' or absolute path), got {v!r}")
        return v

    @field_validator("arms")
    @classmethod
    def _arms_known_and_unique(cls, v: list[str]) -> list[str]:
        from imm_ray.loop.arms import ARMS

        if not v or len(set(v)) != len(v):
            raise ValueError(f"run.arms must be a non-empty list without repeats, got {v}")
        return [_known("arm", arm, ARMS) for arm in v]


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
    storage: StorageConfig = StorageConfig()

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
            raise ConfigError(f"config file {p} does not exist (check the path given to --config)")
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
            raise ConfigError(unknown_name("preset", preset_name, PRESETS))
        tree = deep_merge(PRESETS[preset_name], {"preset": preset_name})
    tree = deep_merge(tree, file_tree)
    return config_from_dict(tree)


def drop_removed_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the :data:`REMOVED_KEYS` it sets, each dropped with a deprecation warning."""
    tree = copy.deepcopy(tree)
    for dotted, why in REMOVED_KEYS.items():
        *parents, last = dotted.split(".")
        node: Any = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            del node[last]
            logger.warning("config key %s is deprecated and ignored (%s): remove it from the config", dotted, why)
    return tree


def config_from_dict(tree: dict[str, Any]) -> ImmConfig:
    """Validate a plain tree into an :class:`ImmConfig`, with errors that name the key."""
    try:
        return ImmConfig.model_validate(drop_removed_keys(tree))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{loc}: unknown key{_nearest_key(err['loc'])}")
            elif err["type"] == "value_error":
                problems.append(f"{loc}: {err['ctx']['error']}")
            else:
                problems.append(f"{loc}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _nearest_key(loc: tuple[str | int, ...]) -> str:
    """`` (did you mean a.b.c?)`` for an unknown key at ``loc`` (by the fields of the model holding it)."""
    node: Any = ImmConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            node = _item_type(node)
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = _model_type(node.model_fields[part].annotation)
        else:
            return ""
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1)
    prefix = "".join(f"{p}." for p in loc[:-1])
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys here: {', '.join(node.model_fields)})"


def _model_type(annotation: Any) -> Any:
    """``X`` from ``X``, ``X | None`` or ``Optional[X]``; anything else as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _item_type(annotation: Any) -> Any:
    """``X`` from ``list[X]`` (or ``list[X] | None``)."""
    args = typing.get_args(_model_type(annotation))
    return _model_type(args[0]) if typing.get_origin(_model_type(annotation)) is list and args else None


def config_to_yaml(cfg: ImmConfig) -> str:
    """Serialise the resolved config (the form saved as ``run.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that may change when a run is resumed: they do not change what finished stages produced.
RESUMABLE_CHANGES = (
    "run.rounds", "run.concurrent_arms", "run.progress", "run.report", "run.analyze", "run.metric_sinks",
    "ray.", "serve.", "storage.",
    "generate.num_actors", "generate.entropy_top_k", "generate.entropy_stride",
    "train.max_failures", "train.checkpoint_every_steps", "train.checkpoint_min_interval_s", *REMOVED_KEYS,
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
