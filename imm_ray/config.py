"""One typed configuration tree for a run, with named presets and ``a.b=c`` overrides.

A config is built in layers: the defaults of the pydantic models, then an optional named preset
(``preset: paper`` in the YAML or ``--preset``), then the YAML file, then command-line overrides.
The resolved tree is saved as ``run.yaml`` in the run directory (:func:`config_to_yaml`) and read back
by :func:`load_run_config`.
"""

from __future__ import annotations

import copy
import difflib
import logging
import types
import typing
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
from imm_ray.data.spec import PRESET_FIELDS
from imm_ray.errors import UserError, known_name, unknown_name
from imm_ray.evaluate.settings import EvalSettings
from imm_ray.generate.settings import EngineSettings
from imm_ray.merge.methods import DROP_RATE, IMM_LAM
from imm_ray.merge.options import MergeRecipe
from imm_ray.placement import custom_resources
from imm_ray.run import layout
from imm_ray.run.arms import ARMS, get_arm
from imm_ray.run.files import read_config_text
from imm_ray.serve.settings import ServeSettings
from imm_ray.storage import Location, StorageOptions, resolve
from imm_ray.train import SFTSettings
from imm_ray.verify.judge import DEFAULT_JUDGE_PROMPT

logger = logging.getLogger(__name__)

# Keys that no longer do anything: an old run.yaml or config file that sets one still loads (the key
# is dropped with a warning), and a resume never refuses a change to one.
REMOVED_KEYS: dict[str, str] = {
    "generate.chunk_size": "each generator streams all its prompts through its engine at once",
}


class ConfigError(UserError, ValueError):
    """The configuration is invalid; the message says which key and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Strict):
    """Which model the run starts from."""

    ref: str = "embedded:smollm2-135m-instruct"
    """The model to improve: embedded:<name>, a local Hugging Face folder, an s3:// folder or a hub id."""
    teacher: str | None = None
    """Distillation: a (stronger) model that writes the training data every round (the student, ref, is
    fine-tuned and merged with its own original weights); unset: the model writes its own data."""
    cache_dir: str | None = None
    """Where converted embedded models are cached (default: $IMM_CACHE_DIR, else ~/.cache/imm-ray)."""


class ActorResources(_Strict):
    """Ray resources for one actor or task."""

    num_cpus: float = 1.0
    """CPUs Ray reserves for each actor or task of the stage."""
    num_gpus: float = 0.0
    """GPUs (fractions allowed) Ray reserves for each actor or task of the stage."""
    resources: dict[str, float] = {}
    """Custom Ray resources, e.g. {node_1: 0.01} to pin the stage to the node that offers node_1."""

    @field_validator("resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v)


class DataConfig(_Strict):
    """Problem sets: the ID training pool and the evaluation sets (first = in-domain)."""

    dir: str | None = None
    """Data root the presets look in first (<dir>/<dataset>/<split>.jsonl; a path or s3:// / gs:// URI); then
    $IMM_DATA_DIR, the sets bundled with the package (when the rows asked for lie inside them), the hub."""
    train: DatasetSpec = DatasetSpec(name="gsm8k-train", preset="gsm8k", split="train")
    """The in-domain training pool the model samples answers for every round."""
    eval: list[DatasetSpec] = Field(
        default_factory=lambda: [
            DatasetSpec(name="gsm8k", preset="gsm8k", split="test"),
            DatasetSpec(name="svamp", preset="svamp", split="test"),
        ]
    )
    """Evaluation sets (the first is the in-domain test set, the others out-of-domain)."""
    prompt_template: str = "chat"
    """How a question becomes a prompt: chat (the model's chat template) or alpaca."""
    system_prompt: str | None = None
    """System message of the chat template (default none)."""
    instruction_suffix: str | None = None
    """Text appended to each question under the chat template (default: ask for 'The answer is <number>.')."""

    @field_validator("prompt_template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from imm_ray.data.prompts import PROMPT_TEMPLATES

        return known_name("prompt template", v, PROMPT_TEMPLATES)

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

    engine: EngineSettings = EngineSettings()
    """The inference engine of the generator actors (and of evaluation)."""
    num_actors: int = Field(1, ge=1)
    """Generator actors, each with its own engine."""
    resources: ActorResources = ActorResources()
    """Ray resources of each generator actor."""
    samples_per_question: int = Field(4, ge=1)
    """Answers sampled per training question each round."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature (0: greedy, so several samples are identical and deduplicated to one)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_tokens: int = Field(512, ge=1)
    """Longest answer in new tokens."""
    stop: list[str] | None = None
    """Strings that end an answer (default: the prompt template's own)."""
    seed: int = 0
    """Sampling seed."""
    entropy_top_k: int = Field(20, ge=0)
    """Collapse metric: per-token entropy of the next-token distribution over its top-k tokens (renormalised),
    averaged per round; 0 turns it off."""
    entropy_stride: int = Field(4, ge=1)
    """Measure the entropy on every n-th training question only (1: all); a sample estimates the round's mean
    (within 2% of all questions' on GSM8K) for less work."""
    release_during_sft: Literal["auto", "always", "never"] = "auto"
    """Shut the generator actors down for SFT: always (their nodes can idle and scale down), never (SFT must fit
    beside them), auto (always when the cluster autoscales, else only when SFT cannot fit beside them)."""


class JudgeConfig(_Strict):
    """The LLM judge of verify.verifier judge: it reads each question and sampled answer and says yes or no."""

    model: str | None = None
    """The judge model (embedded:<name>, a folder, an s3:// folder or a hub id); unset: the run's original model."""
    engine: EngineSettings | None = None
    """The judge's inference engine, hosted in the verifier actors (unset: generate.engine's settings)."""
    prompt: str = DEFAULT_JUDGE_PROMPT
    """The judge's instruction, with {question} and {answer}; it must ask for a last line 'Verdict: yes' or 'no'."""
    max_tokens: int = Field(256, ge=1)
    """Longest judgement in new tokens."""
    samples: int = Field(1, ge=1)
    """Judgements per answer; an answer's score is the share of them that end in 'Verdict: yes'."""
    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature of the judgements (0: greedy, so several samples agree)."""
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Accept an answer whose score is at least this."""


class VerifyConfig(_Strict):
    """Which verifier keeps samples, and whether identical texts are deduplicated."""

    verifier: str = "numeric"
    """How a sample is kept: numeric or math (math-verify) against the gold answer; majority (agrees with most of
    the question's samples) or judge (an LLM says it is right) without one."""
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    """majority: the least share of a question's samples its most common answer needs to become the pseudo-label."""
    judge: JudgeConfig = JudgeConfig()
    """The LLM judge of verifier judge."""
    dedup: bool = True
    """Keep one copy of identical (whitespace-normalised) correct answers to a question."""
    num_actors: int = Field(1, ge=1)
    """Verifier actors, created once per run and kept (rule-based verifiers keep their worker processes warm)."""
    batch_size: int = Field(512, ge=1)
    """Answers a verifier actor checks per call (a question's samples stay together)."""
    resources: ActorResources = ActorResources(num_cpus=0.5)
    """Ray resources of each verifier actor (a judge needs its engine's: e.g. num_gpus 1 with vLLM)."""

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, v: str) -> str:
        from imm_ray.verify import VERIFIERS

        return known_name("verifier", v, VERIFIERS)


_DEFAULT_MERGE_PARAMS = {"lam": IMM_LAM, "drop_rate": DROP_RATE}  # the paper's IMM merge


class MergeConfig(_Strict, MergeRecipe):
    """The merge after each round's SFT (arm ``imm``): a merge recipe (method, params, seed) and where
    the loop runs it."""

    params: dict[str, Any] = Field(default_factory=lambda: dict(_DEFAULT_MERGE_PARAMS), validate_default=True)
    """The method's parameters (imm: lam, drop_rate), checked against the method even when left at the default."""
    anchor: str = "original"
    """What the fine-tuned model is merged with: original (the run's starting model) or a model reference."""
    resources: ActorResources = ActorResources()
    """Ray resources of the merge task."""
    sweep: dict[str, list[Any]] = {}
    """Merges scored on the probe split each round: param -> values, all combinations (a list: lam values)."""
    select: Literal["fixed", "frontier"] = "fixed"
    """The round's merge: fixed (params) or frontier (best OOD probe accuracy keeping half the best ID gain)."""
    probe_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """With a sweep: each eval set's share the candidates are scored on; every reported eval uses the rest."""
    probe_seed: int = 0
    """Seed of the probe split: which questions of each eval set are probe questions."""

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

    @field_validator("sweep", mode="before")
    @classmethod
    def _lam_list(cls, v: Any) -> Any:
        """A plain list of numbers is a sweep of lam."""
        return {"lam": v} if isinstance(v, list) else v

    @field_validator("sweep")
    @classmethod
    def _sweep_values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in v.items():
            if not values or len({repr(x) for x in values}) != len(values):
                raise ValueError(f"parameter {name!r} needs a non-empty list of distinct values, got {values}")
        return v

    @model_validator(mode="after")
    def _valid_candidates(self) -> "MergeConfig":
        """Each candidate of the sweep is a valid parameter set of the method; frontier needs a sweep."""
        from imm_ray.merge import MergeError, get_merge_method
        from imm_ray.merge.sweep import sweep_candidates

        if self.select == "frontier" and not self.sweep:
            raise ValueError("merge.select: frontier picks among the candidates of merge.sweep: set merge.sweep "
                             "(e.g. [0.25, 0.5, 0.75, 1.0])")
        for params in sweep_candidates(self.params, self.sweep):
            try:
                get_merge_method(self.method).validate(params, n_models=1)
            except MergeError as exc:
                raise ValueError(f"merge.sweep candidate {params}: {exc}") from None
        return self


class NodeTypeConfig(_Strict):
    """One worker node type an autoscaler may add (``ray.node_types``)."""

    resources: dict[str, float]
    """What one node of the type offers Ray, e.g. {CPU: 8, GPU: 1} (custom resources too)."""
    max_workers: int = Field(ge=0)
    """The most nodes of this type the autoscaler runs at once."""

    @field_validator("resources")
    @classmethod
    def _offers_something(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(amount < 0 for amount in v.values()):
            raise ValueError(f"a node type offers some resources, each >= 0, e.g. {{CPU: 8, GPU: 1}}; got {v}")
        return v


class RayConfig(_Strict):
    """How the driver reaches Ray (an address, or a local head started in-process) and waits for resources."""

    address: str | None = None
    """Ray cluster to join (e.g. ray://head:10001 or auto); default $RAY_ADDRESS, else a local loopback head."""
    num_cpus: int | None = None
    """CPUs of the local head (default: all of this machine's); ignored when joining a cluster."""
    include_dashboard: bool = False
    """Start the Ray dashboard with the local head."""
    node_types: dict[str, NodeTypeConfig] = {}
    """Worker node types an autoscaler may add (e.g. a KubeRay cluster's worker groups): stages wait for them."""
    cluster_yaml: str | None = None
    """The cluster YAML launched with `ray up` (on its head: ~/ray_bootstrap_config.yaml); its node types count."""
    placement_log_s: float = Field(60.0, gt=0)
    """While stages wait for resources (e.g. for the autoscaler to add a node), log what is pending this often."""
    placement_timeout_s: float = Field(900.0, gt=0)
    """Give up waiting for resources after this many seconds (a GPU node's cold start fits; Ray Train's worker
    start waits as long)."""

    @model_validator(mode="after")
    def _one_source_of_node_types(self) -> "RayConfig":
        if self.node_types and self.cluster_yaml:
            raise ValueError("set ray.node_types or ray.cluster_yaml, not both (the YAML's node types are the ones "
                             "its autoscaler starts)")
        return self


class RunSettings(_Strict):
    """The loop itself."""

    name: str = "imm"
    """Run name: the run directory's default folder name ($IMM_RUNS_DIR/<name>)."""
    rounds: int = Field(2, ge=1)
    """Self-improvement rounds (generate, verify, fine-tune, merge, evaluate)."""
    arms: list[str] = Field(default_factory=lambda: ["imm"])
    """Methods compared: imm, si, rest (what each does is the table imm_ray.run.arms.ARMS)."""
    concurrent_arms: int = Field(1, ge=0)
    """Arms run at once, each with its own generator pool and SFT, when the cluster holds them all
    (1: one after another; 0: as many as fit)."""
    progress: bool = True
    """Show progress bars."""
    report: bool = True
    """Write report.md and plots/ at the end of every run."""
    analyze: bool = False
    """Layer analysis (parameter change vs importance) at the end of the run."""
    analyze_probe_size: int = Field(16, ge=1)
    """Problems of the layer analysis's importance probe."""
    metric_sinks: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    """Also publish the metrics to these: tensorboard (<run>/tensorboard) and/or mlflow."""
    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v or v.startswith("~") or "\0" in v:
            raise ValueError(f"run.name must be a plain folder name (no '/', '..', '~' or absolute path), got {v!r}")
        return v

    @field_validator("arms")
    @classmethod
    def _arms_known_and_unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"run.arms must be a non-empty list without repeats, got {v}")
        return [known_name("arm", arm, ARMS) for arm in v]


class ImmConfig(_Strict):
    """The whole configuration tree of an IMM run."""

    preset: str | None = None
    """Named preset applied under the file: paper or cpu-small (also --preset)."""
    run: RunSettings = RunSettings()
    """The loop: rounds, arms, reporting."""
    model: ModelConfig = ModelConfig()
    """The model the run starts from."""
    data: DataConfig = DataConfig()
    """Training pool, evaluation sets and prompt format."""
    generate: GenerateConfig = GenerateConfig()
    """Sampling answers to the training questions."""
    verify: VerifyConfig = VerifyConfig()
    """Checking the sampled answers."""
    train: SFTSettings = SFTSettings()
    """Supervised fine-tuning on the accepted answers (Ray Train)."""
    merge: MergeConfig = MergeConfig()
    """Merging the fine-tuned model with the anchor."""
    evaluate: EvalSettings = EvalSettings()
    """Greedy evaluation of every round's model."""
    ray: RayConfig = RayConfig()
    """Connecting to Ray and waiting for resources."""
    serve: ServeSettings = ServeSettings()
    """Serving the run's rounds over an OpenAI-compatible API."""
    storage: StorageOptions = StorageOptions()
    """Object storage for s3:// run directories."""

    @model_validator(mode="after")
    def _check(self) -> "ImmConfig":
        if not self.data.eval:
            raise ValueError("data.eval needs at least one data set (the first is the in-domain test set)")
        if self.merge.sweep:
            if len(self.data.eval) < 2:
                raise ValueError("merge.sweep scores candidates in-domain and out-of-domain: data.eval needs at "
                                 "least two sets (the first is in-domain)")
            if not any(get_arm(arm).merges for arm in self.run.arms):
                raise ValueError(f"merge.sweep is set but no arm of run.arms ({', '.join(self.run.arms)}) merges: "
                                 "add imm or drop merge.sweep")
        return self


# Named presets: partial trees applied under the YAML file.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' settings (Yuan et al. 2025, merge_syn scripts + MergeLM DARE).
    "paper": {
        "run": {"rounds": 3, "arms": ["imm", "si"]},
        "data": {"prompt_template": "alpaca"},
        # The authors' scripts decode greedily, so their 3 samples are one answer after dedup;
        # the collapse metrics (distinct answers, entropy) need distinct samples: 3 at 0.7.
        "generate": {"samples_per_question": 3, "temperature": 0.7, "max_tokens": 512},
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
        "merge": {"method": "imm", "params": dict(_DEFAULT_MERGE_PARAMS), "seed": 0},
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
        file_tree = _specs_as_given(_yaml_mapping(p.read_text(), f"config file {p}", empty_ok=True))  # run.yaml too
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


# --- run.yaml: the config a run directory keeps --------------------------------------------------

def config_to_yaml(cfg: ImmConfig) -> str:
    """Serialise the resolved config as ``run.yaml``: every key's value, except that each data set
    holds only the fields its config set. Which fields are set decides what a data-set preset
    supplies (:data:`PRESET_FIELDS`), so a data set written in full would reload as another one."""
    tree = cfg.model_dump(mode="json")
    tree["data"]["train"] = cfg.data.train.model_dump(mode="json", exclude_unset=True)
    tree["data"]["eval"] = [spec.model_dump(mode="json", exclude_unset=True) for spec in cfg.data.eval]
    return yaml.safe_dump(tree, sort_keys=False)


# The fields of a data set in the full form that run.yaml had before it kept data sets as given
# (frozen: a field added to DatasetSpec since is absent from that form).
_FULL_FORM_FIELDS = frozenset({"name", "preset", "path", "hub_id", "hub_config", "split", "question_field",
                               "answer_field", "id_field", "answer_format", "offset", "limit", "strict"})


def _as_given(spec: Any) -> Any:
    """A data set of a config file as its config gave it.

    A data set in the full form (every field written out) reads as one that left a preset's field
    holding the :class:`DatasetSpec` default to the preset, as the config that wrote it almost
    surely did (only one that set such a field to exactly that default reads back otherwise)."""
    if not isinstance(spec, dict) or spec.get("preset") is None or not _FULL_FORM_FIELDS <= set(spec):
        return spec
    defaults = {name: DatasetSpec.model_fields[name].default for name in PRESET_FIELDS}
    return {key: value for key, value in spec.items() if key not in defaults or value != defaults[key]}


def _specs_as_given(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` (a config file's, changed in place) with its data sets as their config gave them."""
    data = tree.get("data")
    if isinstance(data, dict):
        if "train" in data:
            data["train"] = _as_given(data["train"])
        if isinstance(data.get("eval"), list):
            data["eval"] = [_as_given(spec) for spec in data["eval"]]
    return tree


def _yaml_mapping(text: str, source: str, empty_ok: bool) -> dict[str, Any]:
    """The mapping a YAML config text holds (an empty text: {} when ``empty_ok``); ConfigError naming
    ``source`` otherwise."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if tree is None and empty_ok:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must hold a mapping at the top level")
    return tree


def config_from_run_yaml(text: str, source: str = layout.CONFIG) -> ImmConfig:
    """The config saved as a run's ``run.yaml`` (this version's form or the full form of earlier ones)."""
    tree = _yaml_mapping(text, source, empty_ok=False)
    try:
        return config_from_dict(_specs_as_given(tree))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_run_config(run_dir: str | Path | Location) -> ImmConfig:
    """The config of the run in ``run_dir`` (a path or an object-store URI), read from its ``run.yaml``."""
    root = resolve(run_dir)
    text = read_config_text(root)
    if text is None:
        raise ConfigError(f"{root / layout.CONFIG} does not exist: {run_dir} is not an imm run directory")
    return config_from_run_yaml(text, str(root / layout.CONFIG))


# Keys that may change when a run is resumed: they do not change what finished stages produced.
RESUMABLE_CHANGES = (
    "run.rounds", "run.concurrent_arms", "run.progress", "run.report", "run.analyze", "run.metric_sinks",
    "ray.", "serve.", "storage.",
    "generate.num_actors", "generate.entropy_top_k", "generate.entropy_stride", "verify.num_actors",
    "train.max_failures", "train.checkpoint_every_steps", "train.checkpoint_min_interval_s",
    # How SFT holds the model in memory (an SFT stage that ran out of memory resumes with fsdp).
    "train.strategy", "train.activation_checkpointing",
)


def effective_tree(cfg: ImmConfig) -> dict[str, Any]:
    """``cfg`` as a tree of what each key does: every value, and each data set's :data:`PRESET_FIELDS`
    that it leaves to its preset marked as such (they read as the preset's, whatever the default)."""
    tree = cfg.model_dump(mode="json")

    def effective(spec: DatasetSpec) -> dict[str, Any]:
        fields = spec.model_dump(mode="json")
        if spec.preset is not None:
            fields.update({name: f"<preset {spec.preset}>" for name in PRESET_FIELDS
                           if name not in spec.model_fields_set})
        return fields

    tree["data"]["train"] = effective(cfg.data.train)
    tree["data"]["eval"] = [effective(spec) for spec in cfg.data.eval]
    return tree


def resume_differences(saved: ImmConfig, cfg: ImmConfig) -> list[str]:
    """Dotted keys that a resume with ``cfg`` changes in a run ``saved`` (its run.yaml), where the change
    matters: keys outside :data:`RESUMABLE_CHANGES` whose effective values differ."""
    return [key for key in config_differences(effective_tree(saved), effective_tree(cfg))
            if not key.startswith(RESUMABLE_CHANGES)]


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
