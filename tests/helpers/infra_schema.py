"""A compact JSON Schema of the KubeRay (``ray.io/v1``) resources in ``infra/``, and the rules it
cannot express.

Written by us from KubeRay's API reference (RayCluster, RayJob, RayService of operator v1.6),
not copied from its CRDs: the fields KubeRay requires, the ones our manifests rely on, and the
names of the other optional fields, so that a misspelt field fails here as it would fail
``kubectl apply`` (strict field validation). Embedded pod templates are left loose here and are
checked against Kubernetes' own ``PodTemplateSpec`` schema by the tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import jsonschema
import yaml

_NAME = {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}  # DNS-1035
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams: strings
_COUNT = {"type": "integer", "minimum": 0}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"metadata": {"type": "object"}, "spec": {"type": "object", "required": ["containers"]}},
}

_AUTOSCALER = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{k: {"type": "object"} for k in ("resources", "securityContext")},
        **{k: {"type": "array"} for k in ("env", "envFrom", "volumeMounts")},
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "idleTimeoutSeconds": _COUNT,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
    },
}

_HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "rayStartParams": _STR_MAP,
        "template": _TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "resources": _STR_MAP,
        "labels": _STR_MAP,
    },
}

_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": _NAME,
        "replicas": _COUNT,
        "minReplicas": _COUNT,
        "maxReplicas": _COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": _COUNT,
        "suspend": {"type": "boolean"},
        "scaleStrategy": {"type": "object"},
        "rayStartParams": _STR_MAP,
        "template": _TEMPLATE,
        "resources": _STR_MAP,
        "labels": _STR_MAP,
    },
}

_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec", "rayVersion"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER,
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mode": {"enum": ["disabled", "token"]},
                "secretName": {"type": "string"},
                "enableK8sTokenAuth": {"type": "boolean"},
            },
        },
        "headServiceAnnotations": _STR_MAP,
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
    },
}

_RAYJOB_SPEC = {
    "type": "object",
    "required": ["entrypoint"],
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "clusterSelector": {
            "type": "object",
            "required": ["ray.io/cluster"],
            "additionalProperties": {"type": "string", "minLength": 1},
        },
        "rayClusterSpec": _CLUSTER_SPEC,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "backoffLimit": _COUNT,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": _COUNT,
        "suspend": {"type": "boolean"},
        "jobId": {"type": "string"},
        "metadata": _STR_MAP,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "submitterPodTemplate": _TEMPLATE,
        "submitterConfig": {"type": "object"},
        "deletionStrategy": {"type": "object"},
        "managedBy": {"type": "string"},
    },
    "allOf": [
        {
            "description": "exactly one of rayClusterSpec (a cluster of its own) and clusterSelector",
            "oneOf": [
                {"required": ["rayClusterSpec"], "not": {"required": ["clusterSelector"]}},
                {"required": ["clusterSelector"], "not": {"required": ["rayClusterSpec"]}},
            ],
        }
    ],
    # KubeRay deletes only clusters a RayJob created: shutdown and its TTL need rayClusterSpec,
    # and a TTL needs shutdownAfterJobFinishes (ValidateRayJobSpec).
    "if": {"required": ["clusterSelector"]},
    "then": {"properties": {"shutdownAfterJobFinishes": {"const": False}, "ttlSecondsAfterFinished": False}},
    "dependentSchemas": {
        "ttlSecondsAfterFinished": {
            "required": ["shutdownAfterJobFinishes"],
            "properties": {"shutdownAfterJobFinishes": {"const": True}},
        }
    },
}

_RAYSERVICE_SPEC = {
    "type": "object",
    "required": ["serveConfigV2", "rayClusterConfig"],
    "additionalProperties": False,
    "properties": {
        "serveConfigV2": {"type": "string", "minLength": 1},
        "rayClusterConfig": _CLUSTER_SPEC,
        "serveService": {"type": "object"},
        "upgradeStrategy": {"type": "object"},
        "excludeHeadPodFromServeSvc": {"type": "boolean"},
        "rayClusterDeletionDelaySeconds": _COUNT,
        "serviceUnhealthySecondThreshold": _COUNT,
        "deploymentUnhealthySecondThreshold": _COUNT,
    },
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": _NAME}},
            "spec": spec,
            "status": False,  # written by the operator, never by us
        },
    }


SCHEMAS = {
    "RayCluster": _resource("RayCluster", _CLUSTER_SPEC),
    "RayJob": _resource("RayJob", _RAYJOB_SPEC),
    "RayService": _resource("RayService", _RAYSERVICE_SPEC),
}


def cluster_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The RayCluster specs in a KubeRay resource, with where they are."""
    spec = doc.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    inner = spec if key is None else spec.get(key)
    if isinstance(inner, dict):
        yield ("spec" if key is None else f"spec.{key}"), inner


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template of a KubeRay resource (head, worker groups, RayJob submitter)."""
    for where, cluster in cluster_specs(doc):
        if isinstance(cluster.get("headGroupSpec", {}).get("template"), dict):
            yield f"{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group.get("template"), dict):
                yield f"{where}.workerGroupSpecs[{i}].template", group["template"]
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
    if doc["kind"] == "RayJob" and isinstance(submitter, dict):
        yield "spec.submitterPodTemplate", submitter


def _rules(doc: dict[str, Any]) -> list[str]:
    """KubeRay's checks beyond the schema (its ValidateRayClusterSpec / ValidateRayJobSpec)."""
    problems = []
    for where, cluster in cluster_specs(doc):
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
        if len(set(names)) != len(names):
            problems.append(f"{where}: worker group names repeat: {names}")
        for group in cluster.get("workerGroupSpecs") or []:
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            n = group.get("replicas", lo)
            if not lo <= n <= hi:
                problems.append(
                    f"{where}: worker group {group.get('groupName')!r}: needs minReplicas <= replicas <= "
                    f"maxReplicas, got {lo} <= {n} <= {hi}"
                )
        for group in [cluster.get("headGroupSpec", {}), *(cluster.get("workerGroupSpecs") or [])]:
            params = group.get("rayStartParams") or {}
            if group.get("resources") and any(k in params for k in ("num-cpus", "num-gpus", "memory")):
                problems.append(f"{where}: resources set in both rayStartParams and resources")
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob" and "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        if not isinstance(env, dict):
            problems.append(f"spec.runtimeEnvYAML must be a YAML mapping, got {env!r}")
    if doc["kind"] == "RayService" and isinstance(spec.get("serveConfigV2"), str):
        problems += serve_config_problems(spec["serveConfigV2"])
    return problems


def serve_config_problems(text: str) -> list[str]:
    """A Serve config (serveConfigV2) that Ray accepts, whose import paths exist in this repo."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        return [f"spec.serveConfigV2: {e}"]
    problems = []
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            problems.append(f"spec.serveConfigV2: application {app.name!r}: {app.import_path}: {e}")
    return problems


def _message(error: jsonschema.ValidationError) -> str:
    """The schema's description where it has one (a oneOf's message repeats the whole object)."""
    return (isinstance(error.schema, dict) and error.schema.get("description")) or error.message


def validate_kuberay(doc: dict[str, Any]) -> list[str]:
    """Every problem of a RayCluster, RayJob or RayService (empty if it is valid)."""
    if doc.get("kind") not in SCHEMAS:
        return [f"not a KubeRay kind: {doc.get('kind')!r}; known: {', '.join(SCHEMAS)}"]
    validator = jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {_message(e)}" for e in errors]
    return problems or _rules(doc)
