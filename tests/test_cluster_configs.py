"""The cluster configs in cluster/ are checked offline, without a cloud account or a Kubernetes cluster.

* Ray cluster launcher YAMLs (cluster/aws, cluster/gcp): Ray's own launcher validation,
  ``validate_config(prepare_config(yaml))``, plus what megaray needs of them (a CPU head with no
  training, spot and on-demand 8-GPU groups, labelled CPU data groups, commands that fail loudly,
  MLflow on the head, token auth, nothing bound to 0.0.0.0).
* KubeRay manifests (cluster/kuberay): the CRDs' ``openAPIV3Schema`` from kuberay v1.7.0
  (cluster/kuberay/schemas/, see its README), made strict as kuberay's scripts/openapi2jsonschema.py
  does, plus the spec rules the operator enforces in Go
  (ray-operator/controllers/ray/utils/validation.go: ValidateRayClusterSpec, ValidateRayJobSpec).
* cluster/runtime_env.yaml against the runtime env that ``megaray train``'s driver adds.
* Version pins: megaray and Ray in every config = pyproject.toml.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import jsonschema
import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*/*.yaml") if p.parent.name not in ("kuberay", "local"))
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
DATA_SELECTOR = {"megaray.io/role": "data"}  # what docs/cluster.md tells users to set as scaling.data_label_selector


def _pins() -> tuple[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = next(
        re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d).group(1) for d in project["dependencies"] if d.startswith("ray[")
    )
    return project["version"], ray


MEGARAY_VERSION, RAY_VERSION = _pins()


# ---------------------------------------------------------------- Ray cluster launcher YAMLs


def _prepared(path: Path) -> Dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def _commands(config: Dict[str, Any]) -> List[str]:
    out = []
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        out += config.get(key, [])
    for node in config["available_node_types"].values():
        out += node.get("initialization_commands", []) + node.get("worker_setup_commands", [])
    return out


def _silent_failures(cmd: str) -> List[str]:
    """Why a setup/start command could fail without stopping the node's setup (empty: it cannot)."""
    problems = [f"{cmd!r}: '|| true' hides a failure"] if re.search(r"\|\|\s*(true|:)\b", cmd) else []
    if ";" in cmd and not cmd.startswith("set -euo pipefail;"):
        problems.append(f"{cmd!r}: several statements without 'set -euo pipefail;' first")
    bash = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    return problems + ([f"{cmd!r}: {bash.stderr.strip()}"] if bash.returncode else [])


def _is_spot(provider: str, node_config: Dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def test_launcher_configs_exist():
    assert {p.parent.name for p in LAUNCHER_YAMLS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.parent.name)
def test_launcher_config_passes_ray_validation_and_has_megaray_shape(path):
    config = _prepared(path)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "nothing may be scheduled on the head"
    assert 0 < config["idle_timeout_minutes"] <= 30
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    data = {n: t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")}
    assert {t["resources"]["GPU"] for t in gpu.values()} == {8}
    for group in (gpu, data):
        markets = {_is_spot(provider, t["node_config"]) for t in group.values()}
        assert markets == {True, False}, f"{path}: want a spot group and an on-demand group beside it"
        assert all(t["min_workers"] == 0 < t["max_workers"] for t in group.values())
        spot_priority = max(t.get("priority", 0) for t in group.values() if _is_spot(provider, t["node_config"]))
        assert spot_priority > max(
            t.get("priority", 0) for t in group.values() if not _is_spot(provider, t["node_config"])
        )
    assert all(t["labels"]["megaray.io/role"] == "gpu" for t in gpu.values())
    assert all(t["labels"].items() >= DATA_SELECTOR.items() for t in data.values())
    assert all(t["resources"]["CPU"] > 0 for t in data.values())
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    for t in types.values():
        validate_node_label_syntax(t.get("labels", {}))
        validate_node_labels(t.get("labels", {}))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.parent.name)
def test_launcher_commands_fail_loudly_start_mlflow_and_keep_ports_closed(path):
    config = _prepared(path)
    commands = _commands(config)
    assert "0.0.0.0" not in path.read_text()
    assert [p for cmd in commands for p in _silent_failures(cmd)] == []
    ray_starts = [c for c in commands if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    bucket = "s3://" if config["provider"]["type"] == "aws" else "gs://"
    mlflow = re.search(r"mlflow server (.*?)>", head_start).group(1)
    assert "--backend-store-uri sqlite:////" in mlflow and f"--artifacts-destination {bucket}" in mlflow
    assert '--host "$HEAD_IP"' in mlflow
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_silent_failure_check_rejects_the_old_install_command():
    old = 'pip install -U pip && pip install "megaray @ file://$HOME/megaray" || true'  # cluster/aws before
    assert _silent_failures(old) == [f"{old!r}: '|| true' hides a failure"]
    assert len(_silent_failures("cd ~/x; pip install .")) == 1
    assert "syntax error" in _silent_failures("set -euo pipefail; if true; then echo")[0]


def test_launcher_validation_rejects_a_misspelled_field():
    raw = yaml.safe_load(LAUNCHER_YAMLS[0].read_text())
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["idle_timeout_minute"] = bad.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_spot"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------- KubeRay manifests


def _strict(node: Any) -> Any:
    """``additionalProperties: false`` wherever ``properties`` are listed and unknown fields are not
    preserved (kuberay scripts/openapi2jsonschema.py ``additional_properties``; kubectl's strict mode)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@functools.cache
def _crd_schema(kind: str, strict: bool = True) -> Dict[str, Any]:
    path = CLUSTER / "kuberay" / "schemas" / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return _strict(schema) if strict else schema


def _schema_errors(doc: Dict[str, Any], strict: bool = True) -> List[str]:
    validator = jsonschema.Draft7Validator(_crd_schema(doc["kind"], strict))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _cluster_spec_errors(spec: Dict[str, Any]) -> List[str]:
    """ValidateRayClusterSpec (kuberay v1.7.0), the rules that can apply to these manifests."""
    from ray._private.label_utils import validate_label_key, validate_label_value

    errors = []
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    version = tuple(int(x) for x in spec.get("rayVersion", "0").split(".")[:3])
    groups = [("Head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{name}: needs at least one container")
        start = group.get("rayStartParams", {})
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in start:
            errors.append(f"{name}: rayStartParams['labels'] is not supported; use the labels field")
        for key, value in (group.get("labels") or {}).items():
            try:
                problem = validate_label_key(key)
                validate_label_value(value)
            except ValueError as e:
                problem = str(e)
            if problem:
                errors.append(f"{name}: label {key}={value}: {problem}")
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{name}: must set minReplicas and maxReplicas when autoscaling is disabled")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{name}: minReplicas {lo} greater than maxReplicas {hi}")
        if group.get("idleTimeoutSeconds") is not None and not v2:
            errors.append(f"{name}: idleTimeoutSeconds needs autoscaler v2")
        if group.get("priority") and (not v2 or version < (2, 56, 0)):
            errors.append(f"{name}: priority needs autoscaler v2 and Ray >= 2.56.0")
        if group.get("suspend") and autoscaling:
            errors.append(f"{name}: cannot be suspended with the autoscaler enabled")
    if (spec.get("authOptions") or {}).get("mode") == "token" and version < (2, 52, 0):
        errors.append("authOptions.mode token needs Ray >= 2.52.0")
    return errors


def _go_rule_errors(doc: Dict[str, Any]) -> List[str]:
    """The metadata and spec rules kuberay v1.7.0 enforces in Go (ValidateRay{Cluster,Job}Metadata/Spec)."""
    name, spec = doc["metadata"]["name"], doc["spec"]
    limit = 53 if doc["kind"] == "RayCluster" else 47
    errors = [] if len(name) <= limit and _DNS1035.fullmatch(name) else [f"name {name!r}: DNS-1035, <= {limit}"]
    if doc["kind"] == "RayCluster":
        return errors + _cluster_spec_errors(spec)
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    selector = spec.get("clusterSelector") or {}
    if spec.get("rayClusterSpec") is None and not selector:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if selector and (
        not selector.get("ray.io/cluster")
        or spec.get("submissionMode") == "SidecarMode"
        or spec.get("suspend")
        or (spec.get("backoffLimit") or 0) > 0
    ):
        errors.append("clusterSelector needs ray.io/cluster, no SidecarMode, no suspend, no backoffLimit")
    if spec.get("submissionMode") == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    yaml.safe_load(spec.get("runtimeEnvYAML", ""))  # must parse as YAML
    if spec.get("rayClusterSpec") is not None:
        errors += [f"rayClusterSpec: {e}" for e in _cluster_spec_errors(spec["rayClusterSpec"])]
    return errors


def _manifest(name: str) -> Dict[str, Any]:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def test_kuberay_manifests_exist():
    assert {_manifest(p.name)["kind"] for p in KUBERAY_YAMLS} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_strict_crd_schema_and_go_rules(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(doc) == []
    assert _go_rule_errors(doc) == []


def test_kuberay_manifests_have_megaray_shape():
    cluster, job = _manifest("raycluster.yaml"), _manifest("rayjob.yaml")
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec, "rayjob.yaml's cluster must stay the same as raycluster.yaml"
    assert spec["enableInTreeAutoscaling"] and spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["resources"] == {"CPU": "0"} and head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "dashboard-host" not in head["rayStartParams"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if g["labels"]["megaray.io/role"] == "gpu"]
    assert {g["labels"]["megaray.io/market"] for g in gpu} == {"spot", "on-demand"}
    for g in gpu:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and g["minReplicas"] == 0 < g["maxReplicas"]
    data = [g for g in groups.values() if g["labels"].items() >= DATA_SELECTOR.items()]
    assert data and all(
        "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in data
    )
    images = {c["image"] for g in [head, *groups.values()] for c in g["template"]["spec"]["containers"]}
    assert images == {f"ghcr.io/your-org/megaray:{MEGARAY_VERSION}"}, "every pod runs cluster/Dockerfile's image"
    js = job["spec"]
    assert js["submissionMode"] == "K8sJobMode" and js["entrypoint"].startswith("megaray train ")
    assert js["shutdownAfterJobFinishes"] is True and js["ttlSecondsAfterFinished"] > 0


def test_strict_schema_rejects_misspelled_fields_the_plain_crd_accepts():
    cluster = _manifest("raycluster.yaml")
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParam"] = bad["spec"]["headGroupSpec"].pop("rayStartParams")
    assert _schema_errors(bad, strict=False) == []  # the CRD as served lets it through (then drops it)
    assert any("rayStartParam" in e for e in _schema_errors(bad))
    bad = copy.deepcopy(cluster)
    container = bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # inside the embedded Pod template
    assert any("'resource' was unexpected" in e for e in _schema_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("maxReplicas" in e for e in _schema_errors(bad))
    job = copy.deepcopy(_manifest("rayjob.yaml"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in _schema_errors(job))


def test_go_rules_reject_what_kuberay_rejects():
    job = _manifest("rayjob.yaml")
    no_cluster = copy.deepcopy(job)
    del no_cluster["spec"]["rayClusterSpec"]
    assert _schema_errors(no_cluster) == []  # the schema allows it: only the operator's Go check catches it
    assert "one of rayClusterSpec or clusterSelector must be set" in _go_rule_errors(no_cluster)
    selector = copy.deepcopy(no_cluster)
    selector["spec"].update(clusterSelector={"ray.io/cluster": "megaray"}, backoffLimit=0)
    assert _go_rule_errors(selector) == []
    suspended = copy.deepcopy(job)
    suspended["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0)
    assert _go_rule_errors(suspended) == ["suspend needs shutdownAfterJobFinishes"]
    ttl = copy.deepcopy(job)
    ttl["spec"]["shutdownAfterJobFinishes"] = False
    assert _go_rule_errors(ttl) == ["ttlSecondsAfterFinished needs shutdownAfterJobFinishes"]
    cluster = _manifest("raycluster.yaml")
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0].update(minReplicas=9, maxReplicas=8)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "0"  # and resources: {CPU: "0"}
    bad["spec"]["autoscalerOptions"].pop("version")  # priority, idleTimeoutSeconds need v2
    assert _go_rule_errors(bad) == [
        "Head: resources set in both rayStartParams and resources",
        "gpu-spot: minReplicas 9 greater than maxReplicas 8",
        "gpu-spot: priority needs autoscaler v2 and Ray >= 2.56.0",
        "gpu-on-demand: priority needs autoscaler v2 and Ray >= 2.56.0",
        "data: idleTimeoutSeconds needs autoscaler v2",
    ]


def test_kuberay_schemas_are_the_recorded_upstream_files():
    import hashlib

    readme = (CLUSTER / "kuberay" / "schemas" / "README.md").read_text()
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        digest = hashlib.sha256((CLUSTER / "kuberay" / "schemas" / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme


# ---------------------------------------------------------------- runtime env, data placement, pins


def test_runtime_env_merges_with_the_megaray_driver_runtime_env(monkeypatch):
    """`ray job submit --runtime-env cluster/runtime_env.yaml -- megaray train`: the driver's
    ray.init(runtime_env=...) is merged with the job's; Ray raises if both name an env var."""
    import ray
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from megaray.train import launch

    job_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**job_env)  # a valid runtime env
    assert "pip" not in job_env and "conda" not in job_env
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    launch.ensure_ray()
    driver_env = seen["runtime_env"]
    assert driver_env["env_vars"]
    assert _merge_runtime_env(job_env, driver_env) is not None
    clash = dict(job_env, env_vars={**job_env["env_vars"], "OMP_NUM_THREADS": "8"})
    assert _merge_runtime_env(clash, driver_env) is None  # what the file's comment warns about


def test_data_label_selector_matches_the_data_nodes_and_reaches_ray_data(tmp_path):
    """``scaling.data_label_selector`` becomes the ``label_selector`` of the execution options Ray
    Train gives every dataset (``DataConfig._resolve_execution_options``, which ``configure`` puts
    into each dataset's context); the data node groups above carry the label it selects."""
    from types import SimpleNamespace

    from ray._private.label_utils import validate_label_selector

    from megaray.families import load_config
    from megaray.train import launch

    assert validate_label_selector(DATA_SELECTOR) is None
    for overrides, want in ((["scaling.data_label_selector={megaray.io/role: data}"], DATA_SELECTOR), ([], None)):
        cfg = load_config(REPO / "configs" / "gpt_debug.yaml", overrides)
        spec = SimpleNamespace(loop_config=dict, run_dir=str(tmp_path / "run"), mlflow_run_id=None, tracking_uri=None)
        trainer = launch._trainer(cfg, spec, datasets={}, storage=str(tmp_path), callbacks=[])
        options = trainer.data_config._resolve_execution_options("train")
        assert options.label_selector == want and options.preserve_order


def test_megaray_and_ray_pins_match_pyproject():
    wheel = f"megaray-{MEGARAY_VERSION}-py3-none-any.whl"
    for path in LAUNCHER_YAMLS:
        text = path.read_text()
        assert wheel in text and f"want {MEGARAY_VERSION}'" in text, path
        assert set(re.findall(r"megaray-([0-9][^-]*)-py3", text)) == {MEGARAY_VERSION}, path
        assert set(re.findall(r"rayproject/ray:([0-9.]+)-", text)) == {RAY_VERSION}, path
        assert f"want {RAY_VERSION}'" in text, path
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{RAY_VERSION}-" in dockerfile
    assert f"ARG MEGARAY_VERSION={MEGARAY_VERSION}\n" in dockerfile and f"want {RAY_VERSION}'" in dockerfile
    for path in KUBERAY_YAMLS:
        text = path.read_text()
        assert set(re.findall(r"megaray:([0-9][0-9.]*)", text)) == {MEGARAY_VERSION}, path
        assert f'rayVersion: "{RAY_VERSION}"' in text, path
