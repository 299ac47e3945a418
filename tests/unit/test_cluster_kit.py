"""The cluster kit, validated offline as strictly as the tools that will read it.

- ``cluster/aws.yaml``, ``cluster/gcp.yaml``: Ray's own ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs before launching).
- ``cluster/k8s/*.yaml``: the KubeRay v1.7.0 CRD schemas with every object closed (typos fail, as
  ``kubeconform -strict``), the operator's own rules, ``serveConfigV2`` through Serve's schema and
  this project's settings, the RayJob's entrypoint module and config, ``runtimeEnvYAML`` keys.
- ``cluster/Dockerfile``: base tag, Ray pin and version agree with ``pyproject.toml``.

Each check also runs on a copy with one misspelled field, which must fail it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCHEMAS = CLUSTER / "schemas" / "kuberay-v1.7.0"  # vendored, Apache-2.0 (README there)
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(re.fullmatch(r"ray\[[^\]]*\]==([\d.]+)", d).group(1)
               for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))


# ---- KubeRay manifests: strict CRD schema ---------------------------------------------------

def strict(schema: Any) -> Any:
    """The schema with every object that lists ``properties`` closed, int-or-string as either."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft202012Validator]:
    if not SCHEMAS.is_dir():
        pytest.fail(f"the KubeRay CRD schemas are missing: expected {SCHEMAS}")
    return {kind: jsonschema.Draft202012Validator(strict(json.loads(
        (SCHEMAS / f"{kind}.v1.openapi.json").read_text()))) for kind in MANIFESTS}


def schema_errors(validators: dict, doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in validators:
        return [f"unknown kind {kind!r}"]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[kind].iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name is missing")
    return errors


# ---- the operator's rules (ray-operator/controllers/ray/utils/validation.go) -----------------

def cluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    if not spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers"):
        errors.append("headGroupSpec.template needs at least one container")
    for group in spec.get("workerGroupSpecs", []):
        if not group.get("groupName") or not group.get("template"):
            errors.append("each worker group needs groupName and template")
        if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
            errors.append(f"worker group {group.get('groupName')}: minReplicas > maxReplicas")
    autoscaler = spec.get("autoscalerOptions", {})
    if spec.get("enableInTreeAutoscaling") and autoscaler.get("version") == "v2":
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]:
            if template.get("spec", {}).get("restartPolicy") not in (None, "Never"):
                errors.append("autoscaler v2 needs restartPolicy Never or unset")
    return errors


def operator_errors(doc: dict) -> list[str]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return cluster_spec_errors(spec)
    if doc["kind"] == "RayJob":
        errors = []
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            errors.append("a RayJob needs exactly one of rayClusterSpec / clusterSelector")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("suspend needs shutdownAfterJobFinishes")
        if "clusterSelector" in spec and spec.get("backoffLimit", 0) > 0:
            errors.append("clusterSelector cannot go with backoffLimit > 0")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
            errors.append(f"unknown submissionMode {spec.get('submissionMode')!r}")
        return errors + cluster_spec_errors(spec.get("rayClusterSpec", {}))
    return cluster_spec_errors(spec.get("rayClusterConfig", {}))


# ---- what this project adds: entrypoint, runtime env, Serve config ---------------------------

def rayjob_errors(doc: dict) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    spec = doc["spec"]
    errors = []
    argv = shlex.split(spec.get("entrypoint", ""))
    if argv[:2] != ["python", "-m"] or len(argv) < 3:
        return [f"entrypoint {spec.get('entrypoint')!r} is not `python -m MODULE ...`"]
    if importlib.util.find_spec(argv[2]) is None:
        errors.append(f"entrypoint module {argv[2]} does not exist")
    if "--config" in argv:
        config = REPO / argv[argv.index("--config") + 1]
        if not config.is_file():
            errors.append(f"entrypoint config {config} does not exist")
        else:
            from imm_ray.config import load_config

            try:
                load_config(config)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(f"entrypoint config {config} does not load: {exc}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    unknown = set(runtime_env) - RuntimeEnv.known_fields
    if unknown:
        errors.append(f"runtimeEnvYAML keys unknown to Ray: {sorted(unknown)}")
    else:
        RuntimeEnv(**runtime_env)
    return errors


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def rayservice_errors(doc: dict) -> list[str]:
    from pydantic import ValidationError
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from imm_ray.serve.deploy import settings_from_args

    try:
        config = ServeDeploySchema.model_validate(serve_config(doc))
    except ValidationError as exc:
        return [f"serveConfigV2: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"]
    raw = serve_config(doc)
    errors = [f"serveConfigV2: unknown key {k!r}" for k in set(raw) - set(ServeDeploySchema.model_fields)]
    for raw_app in raw.get("applications", []):
        known = set(ServeApplicationSchema.model_fields)
        errors += [f"serveConfigV2 application: unknown key {k!r}" for k in set(raw_app) - known]
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        try:
            if not hasattr(importlib.import_module(module), attr):
                errors.append(f"import_path {app.import_path}: {module} has no {attr}")
        except ImportError as exc:
            errors.append(f"import_path {app.import_path} does not import: {exc}")
        try:
            settings_from_args(app.args)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"application {app.name}: args rejected: {exc}")
        if app.runtime_env and set(app.runtime_env) - RuntimeEnv.known_fields:
            errors.append(f"application {app.name}: runtime_env keys unknown to Ray")
    return errors


def kit_errors(validators: dict, doc: dict) -> list[str]:
    errors = schema_errors(validators, doc)
    if errors:
        return errors
    errors = operator_errors(doc)
    if doc["kind"] == "RayJob":
        errors += rayjob_errors(doc)
    if doc["kind"] == "RayService":
        errors += rayservice_errors(doc)
    return errors


def load(kind: str) -> dict:
    return yaml.safe_load((CLUSTER / "k8s" / MANIFESTS[kind]).read_text())


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
            "RayService": doc["spec"].get("rayClusterConfig")}[doc["kind"]]


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_passes_every_check(validators, kind):
    assert kit_errors(validators, load(kind)) == []


def _rename(tree: dict, path: tuple, new_key: str) -> None:
    *parents, leaf = path
    node = tree
    for p in parents:
        node = node[p]
    node[new_key] = node.pop(leaf)


def _set(tree: dict, path: tuple, value: Any) -> None:
    *parents, leaf = path
    node = tree
    for p in parents:
        node = node[p]
    node[leaf] = value


def _replace(doc: dict, field: str, old: str, new: str) -> None:
    assert old in doc["spec"][field]
    doc["spec"][field] = doc["spec"][field].replace(old, new)


def _serve_edit(doc: dict, edit) -> None:
    config = serve_config(doc)
    edit(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


HEAD = ("spec", "headGroupSpec")
CONTAINER = ("template", "spec", "containers", 0)
BROKEN = {
    # CRD schema (closed objects)
    "cluster: enableInTreeAutoscalling": ("RayCluster", lambda d: _rename(d, ("spec", "enableInTreeAutoscaling"),
                                                                           "enableInTreeAutoscalling")),
    "cluster: container resource limit": ("RayCluster", lambda d: _rename(d, HEAD + CONTAINER + ("resources", "limits"),
                                                                           "limit")),
    "cluster: worker minReplica": ("RayCluster", lambda d: _rename(d, ("spec", "workerGroupSpecs", 0, "minReplicas"),
                                                                    "minReplica")),
    "cluster: rayStartParams as a number": ("RayCluster", lambda d: _set(d, HEAD + ("rayStartParams", "num-cpus"),
                                                                         [0])),
    "job: shutdownAfterJobFinish": ("RayJob", lambda d: _rename(d, ("spec", "shutdownAfterJobFinishes"),
                                                                 "shutdownAfterJobFinish")),
    "service: serveConfigV3": ("RayService", lambda d: _rename(d, ("spec", "serveConfigV2"), "serveConfigV3")),
    # operator rules
    "cluster: minReplicas > maxReplicas": ("RayCluster", lambda d: _set(d, ("spec", "workerGroupSpecs", 0,
                                                                            "minReplicas"), 9)),
    "job: submissionMode": ("RayJob", lambda d: _set(d, ("spec", "submissionMode"), "K8sJob")),
    "job: no cluster": ("RayJob", lambda d: d["spec"].pop("rayClusterSpec")),
    # this project: entrypoint, runtime env, Serve config
    "job: entrypoint module": ("RayJob", lambda d: _replace(d, "entrypoint", "jobs.imm_run", "jobs.imm_runs")),
    "job: entrypoint config": ("RayJob", lambda d: _replace(d, "entrypoint", ".yaml", ".yml")),
    "job: runtimeEnvYAML env_var": ("RayJob", lambda d: _replace(d, "runtimeEnvYAML", "env_vars", "env_var")),
    "service: import_paths": ("RayService", lambda d: _serve_edit(d, lambda c: _rename(
        c, ("applications", 0, "import_path"), "import_paths"))),
    "service: import path attribute": ("RayService", lambda d: _serve_edit(d, lambda c: _set(
        c, ("applications", 0, "import_path"), "services.app:apps"))),
    "service: args resident_model": ("RayService", lambda d: _serve_edit(d, lambda c: _rename(
        c, ("applications", 0, "args", "resident_models"), "resident_model"))),
    "service: runtime_env env_var": ("RayService", lambda d: _serve_edit(d, lambda c: _rename(
        c, ("applications", 0, "runtime_env", "env_vars"), "env_var"))),
    "service: http_option": ("RayService", lambda d: _serve_edit(d, lambda c: _rename(
        c, ("http_options",), "http_option"))),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_misspelled_copy_fails(validators, case):
    kind, edit = BROKEN[case]
    doc = copy.deepcopy(load(kind))
    edit(doc)
    assert kit_errors(validators, doc), f"{case}: the broken copy passed every check"


def test_the_three_manifests_share_one_cluster_spec():
    specs = {kind: cluster_spec(load(kind)) for kind in MANIFESTS}
    assert specs["RayJob"] == specs["RayCluster"] and specs["RayService"] == specs["RayCluster"]
    spec = specs["RayCluster"]
    assert spec["rayVersion"] == RAY_PIN and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no work
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_resumes_and_rayservice_autoscales():
    job = load("RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["IMM_RUNS_DIR"].startswith("s3://")  # retries find the same run (and resume it)
    app = serve_config(load("RayService"))["applications"][0]
    assert app["import_path"] == "services.app:app" and app["args"]["run_dir"].startswith("s3://")
    assert app["args"]["autoscaling"]["enabled"] is True


# ---- images: one version everywhere ---------------------------------------------------------

def images() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kind in MANIFESTS:
        spec = cluster_spec(load(kind))
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            found.setdefault(kind, []).extend(c["image"] for c in template["spec"]["containers"])
    for name in ("aws.yaml", "gcp.yaml"):
        found[name] = [yaml.safe_load((CLUSTER / name).read_text())["docker"]["image"]]
    return found


def test_every_image_is_this_version_of_the_project():
    for where, refs in images().items():
        for ref in refs:
            assert ref.rsplit("/", 1)[-1] == f"imm-ray:{VERSION}", f"{where}: {ref}"


def test_dockerfile_agrees_with_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu(\d+)", base)
    assert m, f"base image {base} is not an official rayproject/ray CUDA tag (VERSION-py3XX-cuXXX)"
    assert m.group(1) == RAY_PIN, f"base image Ray {m.group(1)} != pyproject's ray=={RAY_PIN}"
    minimum = int(re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1))
    assert int(m.group(2)) >= minimum
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', text), "the image must install the project with its GPU extra"
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    for pinned in re.findall(r"ray\[[^\]]*\]==([\d.]+)", text):
        assert pinned == RAY_PIN
    assert re.search(rf'image\.version="{re.escape(VERSION)}"', text)
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"the Dockerfile copies {path}, which does not exist"


# ---- Ray cluster launcher configs -----------------------------------------------------------

def launcher_errors(config: dict) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # noqa: BLE001 - jsonschema and ValueError alike
        return [str(exc).splitlines()[0]]
    return []


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_passes_ray_up_validation(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert launcher_errors(config) == []
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["min_workers"] == 0
    assert all(t.get("max_workers", 0) >= 1 for k, t in types.items() if k != config["head_node_type"])
    assert config["setup_commands"] == []  # Ray's defaults would install another Ray
    assert any("IMM_RUNS_DIR=" in o for o in config["docker"]["run_options"])


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
@pytest.mark.parametrize("key, typo", [("idle_timeout_minutes", "idle_timeout_minute"),
                                       ("head_node_type", "head_node_typ")])
def test_launcher_config_with_a_misspelled_key_fails(name, key, typo):
    config = yaml.safe_load((CLUSTER / name).read_text())
    config[typo] = config.pop(key)
    assert launcher_errors(config)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_with_a_misspelled_docker_key_fails(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    config["docker"]["run_option"] = config["docker"].pop("run_options")
    assert launcher_errors(config)
