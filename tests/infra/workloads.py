"""The pods infra/'s manifests create, and two of the checks of what they promise, as functions
that return problems (empty when it all holds): pods unprivileged, read-only and without Kubernetes
API tokens (``check_pod_hardening``), MLflow's basic auth granting nothing by default
(``check_mlflow_auth``). They take every object of the manifests, so that the tests can show a
weakened copy is refused too. tests/infra/egress.py holds the third, ``check_egress``.
"""

from __future__ import annotations

import configparser
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tests.helpers.infra_schema import cluster_specs

Doc = dict[str, Any]
Role = Literal["ray-head", "ray-worker", "submitter", "mlflow", "postgres", "other"]
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The paths each container writes on its read-only root (emptyDirs); /tmp for the others.
WRITABLE = {"postgres": ("/var/run/postgresql", "/tmp"), "mlflow": ("/run/mlflow-auth", "/tmp")}
WRITTEN_DIRS = ("HOME", "TMPDIR", "RECOMPOSE_CACHE")  # variables naming a directory that is written
_TEMPLATES = {  # where each workload kind keeps its pod template
    "Pod": (),
    **{k: ("spec", "template") for k in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")},
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_ROLES: dict[str, Role] = {"mlflow": "mlflow", "mlflow-postgres": "postgres"}  # by app.kubernetes.io/name
_AUTOSCALER_RESOURCES = {  # KubeRay's, where autoscalerOptions sets none
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "500m", "memory": "512Mi"},
}


@dataclass(frozen=True)
class Pod:
    """A pod the manifests create: where its template is, what it is, its labels as it runs."""

    where: str
    role: Role
    cluster: str | None  # its Ray cluster, e.g. "RayCluster/recompose"; None outside Ray
    labels: Mapping[str, str]
    spec: Doc
    autoscaler: Doc | None = None  # KubeRay's sidecar in an autoscaling head, as autoscalerOptions make it

    def containers(self) -> list[Doc]:
        return [
            *self.spec.get("initContainers", []),
            *self.spec["containers"],
            *filter(None, [self.autoscaler]),
        ]


def workload_pods(docs: Iterable[Doc]) -> list[Pod]:
    """Every pod template: Ray heads and workers (with KubeRay's labels and autoscaler), RayJob
    submitters, and the pods of Deployments, StatefulSets and the other workload kinds."""
    pods = []
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob", "RayService"):
            pods += _ray_pods(d)
        elif d["kind"] in _TEMPLATES:
            template = d
            for key in _TEMPLATES[d["kind"]]:
                template = template[key]
            labels = template.get("metadata", {}).get("labels", {})
            role = _ROLES.get(labels.get("app.kubernetes.io/name", ""), "other")
            pods.append(Pod(f"{d['kind']}/{d['metadata']['name']}", role, None, labels, template["spec"]))
    return pods


def _ray_pods(doc: Doc) -> list[Pod]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    # KubeRay names the cluster of a RayService or RayJob itself: no selector can know the value.
    label = doc["metadata"]["name"] + ("" if doc["kind"] == "RayCluster" else "-generated")
    pods = []
    for _, cluster in cluster_specs(doc):
        head = cluster["headGroupSpec"]["template"]
        sidecar = _autoscaler(cluster) if cluster.get("enableInTreeAutoscaling") else None
        labels = _kuberay_labels(head, "head", label, "headgroup")
        pods.append(Pod(f"{name} head", "ray-head", name, labels, head["spec"], sidecar))
        for group in cluster.get("workerGroupSpecs", []):
            labels = _kuberay_labels(group["template"], "worker", label, group["groupName"])
            where = f"{name} worker group {group['groupName']}"
            pods.append(Pod(where, "ray-worker", name, labels, group["template"]["spec"]))
    submitter = doc["spec"].get("submitterPodTemplate") if doc["kind"] == "RayJob" else None
    if submitter is not None:
        selected = doc["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        cluster_name = f"RayCluster/{selected}" if selected else name
        labels = submitter.get("metadata", {}).get("labels", {})
        pods.append(Pod(f"{name} submitter", "submitter", cluster_name, labels, submitter["spec"]))
    return pods


def _kuberay_labels(template: Doc, node_type: str, cluster: str, group: str) -> dict[str, str]:
    """A Ray pod's labels: KubeRay's defaults, the template's, then those KubeRay keeps (labelPod)."""
    return {
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
        **template.get("metadata", {}).get("labels", {}),
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
    }


def _autoscaler(cluster: Doc) -> Doc:
    """The sidecar KubeRay adds to an autoscaling head: its defaults under autoscalerOptions."""
    options = cluster.get("autoscalerOptions", {})
    return {
        "name": "autoscaler",
        "resources": options.get("resources", _AUTOSCALER_RESOURCES),
        "securityContext": options.get("securityContext"),
        "env": options.get("env", []),
        "volumeMounts": options.get("volumeMounts", []),
    }


# --- pods ------------------------------------------------------------------------------------------


def check_pod_hardening(docs: Iterable[Doc]) -> list[str]:
    """Every pod: no service account token but the autoscaler's, a non-root user, RuntimeDefault
    seccomp; every container: no privilege escalation, no capabilities, a read-only root with
    writable emptyDirs where it writes, requests and limits. RayJob submitters included."""
    docs = list(docs)
    problems = [
        f"RayJob/{d['metadata']['name']}: no submitterPodTemplate (KubeRay's default submitter has no "
        "securityContext and gets the service account token)"
        for d in docs
        if d["kind"] == "RayJob"
        and d["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
        and "submitterPodTemplate" not in d["spec"]
    ]
    for pod in workload_pods(docs):
        problems += [f"{pod.where}: {p}" for p in _pod_problems(pod)]
        for c in pod.containers():
            problems += [f"{pod.where} {c.get('name')}: {p}" for p in _container_problems(pod, c)]
    return problems


def _pod_problems(pod: Pod) -> list[str]:
    spec, context = pod.spec, pod.spec.get("securityContext") or {}
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(
            "automountServiceAccountToken is not false: every container gets a Kubernetes API token"
        )
    if context.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    seccomp = [(c.get("securityContext") or {}).get("seccompProfile") for c in pod.containers()]
    if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault" and not all(
        (s or {}).get("type") == "RuntimeDefault" for s in seccomp
    ):
        problems.append("seccompProfile is not RuntimeDefault")
    tokens = {
        v["name"]
        for v in spec.get("volumes", [])
        if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources", []))
    }
    for c in pod.containers():
        if c is not pod.autoscaler and {m["name"] for m in c.get("volumeMounts", [])} & tokens:
            problems.append(f"{c['name']} mounts a service account token; only the autoscaler needs the API")
    if pod.autoscaler is not None and not any(
        m["name"] in tokens and m["mountPath"] == TOKEN_PATH for m in pod.autoscaler["volumeMounts"]
    ):
        problems.append(f"the autoscaler mounts no service account token at {TOKEN_PATH}: it cannot scale")
    if pod.role == "submitter" and spec.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("restartPolicy is not Never or OnFailure: a Kubernetes Job refuses the pod")
    return problems


def _container_problems(pod: Pod, c: Doc) -> list[str]:
    context = c.get("securityContext") or {}
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
        problems.append("capabilities do not drop ALL")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    for key in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(((c.get("resources") or {}).get(key)) or {})
        problems += [f"no {key}.{r}" for r in sorted(missing)]
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    mounts = [m for m in c.get("volumeMounts", []) if not m.get("readOnly") and m["name"] in volumes]
    scratch = {m["mountPath"] for m in mounts if "emptyDir" in volumes[m["name"]]}
    problems += [
        f"{path} is not a writable emptyDir"
        for path in WRITABLE.get(c["name"], ("/tmp",))
        if path not in scratch
    ]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if (
        pod.role in ("ray-head", "ray-worker")
        and c is pod.spec["containers"][0]
        and "RECOMPOSE_CACHE" not in env
    ):
        problems.append("RECOMPOSE_CACHE is unset: the model and palette caches would go to ~/.cache")
    writable = [m["mountPath"] for m in mounts if "configMap" not in volumes[m["name"]]]
    for var in WRITTEN_DIRS:
        if env.get(var) and not any(
            env[var] == p or env[var].startswith(p.rstrip("/") + "/") for p in writable
        ):
            problems.append(f"{var}={env[var]} is not on a writable volume")
    return problems


# --- MLflow's basic auth --------------------------------------------------------------------------


def check_mlflow_auth(docs: Iterable[Doc]) -> list[str]:
    """MLflow's basic-auth app on, granting nothing by default (default_permission NO_PERMISSIONS),
    its admin from a Secret; the Ray pods logging in with credentials from a Secret."""
    pods = workload_pods(docs)
    servers = [
        (pod, c)
        for pod in pods
        for c in pod.spec["containers"]
        if "mlflow server" in " ".join(c.get("command", []) + c.get("args", []))
    ]
    problems = [] if servers else ["no MLflow server (a container that runs `mlflow server`)"]
    for pod, server in servers:
        problems += [f"{pod.where} {server['name']}: {p}" for p in _auth_problems(server)]
    for pod in pods:
        if pod.role in ("ray-head", "ray-worker"):
            env = {e["name"]: e for e in pod.spec["containers"][0].get("env", [])}
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                if "secretKeyRef" not in ((env.get(var) or {}).get("valueFrom") or {}):
                    problems.append(
                        f"{pod.where}: {var} is not from a Secret: the jobs cannot log in to MLflow"
                    )
    return problems


def _auth_problems(server: Doc) -> list[str]:
    script = "\n".join(server.get("command", []) + server.get("args", []))
    env = {e["name"]: e for e in server.get("env", [])}
    if not re.search(r"--app-name[= ]basic-auth\b", script):
        return ["no `--app-name basic-auth`: no login, anyone who reaches it reads and writes every run"]
    if "MLFLOW_AUTH_CONFIG_PATH" not in env:
        return ["MLFLOW_AUTH_CONFIG_PATH is unset: the packaged basic_auth.ini grants READ to every user"]
    ini = _written_ini(script)
    if ini is None:
        return ['no basic_auth.ini written to "$MLFLOW_AUTH_CONFIG_PATH" (cat > ... <<EOF)']
    problems = []
    permission = ini.get("mlflow", "default_permission", fallback=None)
    if permission != "NO_PERMISSIONS":
        problems.append(
            f"default_permission is {permission}, not NO_PERMISSIONS: users get what they were not granted"
        )
    password = ini.get("mlflow", "admin_password", fallback="$MLFLOW_AUTH_ADMIN_PASSWORD")
    from_secret = "secretKeyRef" in ((env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or {}).get("valueFrom") or {})
    if password != "$MLFLOW_AUTH_ADMIN_PASSWORD" or not from_secret:
        problems.append("the first admin's password is not MLFLOW_AUTH_ADMIN_PASSWORD from a Secret")
    return problems


def _written_ini(script: str) -> configparser.ConfigParser | None:
    """The ini a start script writes with ``cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF ... EOF``."""
    found = re.search(
        r'cat > "\$MLFLOW_AUTH_CONFIG_PATH" <<-?\s*[\'"]?(\w+)[\'"]?\n(.*?)\n\s*\1\s*$', script, re.S | re.M
    )
    if found is None:
        return None
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(textwrap.dedent(found.group(2)))
    return ini
