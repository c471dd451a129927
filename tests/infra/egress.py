"""``check_egress``: egress denied by default and allowed only where each pod of infra/'s manifests
needs it, never to the cloud metadata address; a list of problems, empty when it all holds.

It evaluates the NetworkPolicies as Kubernetes does (a pod selected by an Egress policy opens only
what one of them allows; for a pod of this namespace the other end's ingress must admit it too)
over the pods the manifests create (tests/infra/workloads.py), with the labels KubeRay adds.
Written by us: no library evaluates NetworkPolicies offline. Named ports are not resolved.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.infra.workloads import Doc, Pod, workload_pods

NAMESPACE = "recompose"
METADATA = ("169.254.169.254", "fd00:ec2::254")  # the clouds' instance metadata (node credentials)
KUBE_API_PORTS = frozenset({443, 6443})
DASHBOARD_PORT = 8265  # the Jobs API
RAY_PORTS = (6379, 45678)  # GCS, and one of the ports Ray picks at random (raylet, workers, NCCL)


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (its namespace and labels) or an address outside the pods."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = NAMESPACE
    ip: str | None = None


DNS = Peer("kube-dns", {"k8s-app": "kube-dns"}, namespace="kube-system")


def check_egress(docs: Iterable[Doc]) -> list[str]:
    """Egress denied by default, allowed only where each pod needs it, never to the metadata address."""
    docs = list(docs)
    policies = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"].get("namespace") == NAMESPACE
    ]
    pods = workload_pods(docs)
    store = _artifact_store(docs, pods)
    problems = _default_deny_problems(policies) + _rule_problems(policies)
    for src, dst, port, protocol, what in _needed(pods, store):
        if not connects(policies, _peer(src), dst, port, protocol):
            problems.append(f"{src.where} cannot reach {what} ({dst.name}, {protocol} {port})")
    for src in pods:
        for dst in pods:
            unneeded = (p for p in _listening(dst) if not _may_connect(src, dst, p))
            port = next((p for p in unneeded if connects(policies, _peer(src), _peer(dst), p)), None)
            if port is not None:
                problems.append(f"{src.where} can reach {dst.where} (TCP {port}), which it never needs")
        for address in METADATA:
            if connects(policies, _peer(src), Peer("the metadata address", ip=address), 80):
                problems.append(f"{src.where} can reach the cloud metadata address {address}")
    return problems + _range_problems(policies, pods, store[1] if store else None)


def connects(policies: list[Doc], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether ``src`` may open a connection to ``dst``: its egress allows it and, for a pod of this
    namespace, the destination's ingress admits it."""
    if not _admits(policies, src, dst, port, protocol, "Egress"):
        return False
    return (
        dst.ip is not None
        or dst.namespace != NAMESPACE
        or _admits(policies, dst, src, port, protocol, "Ingress")
    )


def _admits(policies: list[Doc], pod: Peer, other: Peer, port: int, protocol: str, direction: str) -> bool:
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    selecting = [
        p for p in policies if direction in _types(p) and selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True  # a pod no policy of that direction selects is not isolated
    return any(
        _port_matches(rule.get("ports"), port, protocol)
        and (not rule.get(peers) or any(_peer_matches(peer, other) for peer in rule[peers]))
        for policy in selecting
        for rule in policy["spec"].get(key) or []
    )


def selects(selector: Doc | None, labels: Mapping[str, str]) -> bool:
    """A label selector's verdict (matchLabels, matchExpressions); an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(
        tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions") or []
    )


def _types(policy: Doc) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _peer_matches(peer: Doc, other: Peer) -> bool:
    if "ipBlock" in peer:
        # Only addresses outside the pods: a pod's is unknown here, and CNIs differ on ipBlock for pods.
        if other.ip is None or (cidr := _network(peer["ipBlock"].get("cidr", ""))) is None:
            return False
        address = ipaddress.ip_address(other.ip)
        excepted = [n for n in map(_network, peer["ipBlock"].get("except", [])) if n is not None]
        return address in cidr and not any(address in n for n in excepted)
    if other.ip is not None:
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other.namespace})
    else:
        in_namespace = other.namespace == NAMESPACE
    return in_namespace and selects(peer.get("podSelector"), other.labels)


def _port_matches(ports: list[Doc] | None, port: int, protocol: str) -> bool:
    return not ports or any(
        p.get("protocol", "TCP") == protocol
        and (
            "port" not in p
            or (isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", p["port"]))
        )
        for p in ports
    )


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None


def _peer(pod: Pod) -> Peer:
    return Peer(pod.where, pod.labels)


def _default_deny_problems(policies: list[Doc]) -> list[str]:
    def everyone(selector: Doc) -> bool:
        return not (selector.get("matchLabels") or selector.get("matchExpressions"))

    if any(
        everyone(p["spec"]["podSelector"]) and "Egress" in _types(p) and not p["spec"].get("egress")
        for p in policies
    ):
        return []
    return [
        "no default-deny egress policy (podSelector {}, policyTypes [Egress], no egress rules): "
        "a pod no other policy selects may connect anywhere"
    ]


def _rule_problems(policies: list[Doc]) -> list[str]:
    """Rules too wide whatever the pods: no `to`, every namespace, address ranges left open."""
    problems = []
    for policy in policies:
        for i, rule in enumerate(policy["spec"].get("egress") or []):
            where = f"NetworkPolicy/{policy['metadata']['name']} egress[{i}]"
            if not rule.get("to"):
                problems.append(f"{where}: no `to`, so every address, 169.254.169.254 included")
            for peer in rule.get("to") or []:
                if "ipBlock" in peer:
                    problems += [f"{where}: {p}" for p in _block_problems(peer["ipBlock"], rule.get("ports"))]
                elif peer.get("namespaceSelector") == {} and not peer.get("podSelector"):
                    problems.append(f"{where}: every pod of every namespace")
    return problems


def _block_problems(block: Doc, ports: list[Doc] | None) -> list[str]:
    cidr = _network(block.get("cidr", ""))
    if cidr is None:
        return [f"{block.get('cidr')!r} is not a CIDR"]
    excepted = [(e, _network(e)) for e in block.get("except", [])]
    problems = [
        f"except {e} is not inside {cidr} (the API server refuses it)"
        for e, n in excepted
        if n is None or n.version != cidr.version or not n.subnet_of(cidr)
    ]
    for address in map(ipaddress.ip_address, METADATA):
        if address in cidr and not any(n is not None and address in n for _, n in excepted):
            problems.append(f"{cidr} includes the metadata address {address}: list it under `except`")
    if not ports:
        problems.append(f"{cidr} on every port: name the service's ports")
    return problems


def _artifact_store(docs: list[Doc], pods: list[Pod]) -> tuple[Peer | None, int] | None:
    """The MLflow server's S3 endpoint: the in-cluster Service's namespace (None outside the
    cluster) and its port, from MLFLOW_S3_ENDPOINT_URL (AWS S3 itself, 443, when it is unset)."""
    servers = [c for pod in pods if pod.role == "mlflow" for c in pod.spec["containers"]]
    if not servers:
        return None
    url = urlsplit(_env_value(docs, servers[0], "MLFLOW_S3_ENDPOINT_URL") or "https://s3.amazonaws.com")
    port = url.port or (443 if url.scheme == "https" else 80)
    service = re.fullmatch(r"[^.]+\.([^.]+)\.svc(\.cluster\.local)?", url.hostname or "")
    return (Peer(url.netloc, namespace=service.group(1)) if service else None), port


def _env_value(docs: list[Doc], container: Doc, name: str) -> str | None:
    """A variable's value, literal or from a ConfigMap of the manifests."""
    var = next((e for e in container.get("env", []) if e["name"] == name), {})
    ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
    if ref is None:
        return var.get("value")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]]
    return maps[0].get("data", {}).get(ref["key"]) if maps else None


def _needed(
    pods: list[Pod], store: tuple[Peer | None, int] | None
) -> Iterator[tuple[Pod, Peer, int, str, str]]:
    """Every connection the pods need: (from, to, port, protocol, what it is)."""
    ports = {pod.role: _container_port(pod) for pod in pods}
    for src in pods:
        yield src, DNS, 53, "UDP", "DNS"
        yield src, DNS, 53, "TCP", "DNS"
        for dst in pods:
            same_cluster = src.cluster is not None and src.cluster == dst.cluster
            ray = {src.role, dst.role} <= {"ray-head", "ray-worker"}
            for port in RAY_PORTS if ray and same_cluster else ():
                yield src, _peer(dst), port, "TCP", "a pod of its Ray cluster"
            if src.role in ("ray-head", "ray-worker") and dst.role == "mlflow":
                yield src, _peer(dst), ports["mlflow"], "TCP", "MLflow"
            if src.role == "submitter" and dst.role == "ray-head" and same_cluster:
                yield src, _peer(dst), DASHBOARD_PORT, "TCP", "its cluster head's Jobs API"
            if src.role == "mlflow" and dst.role == "postgres":
                yield src, _peer(dst), ports["postgres"], "TCP", "PostgreSQL"
        if src.role == "mlflow" and store is not None and store[0] is not None:
            yield src, store[0], store[1], "TCP", "the artifact store"


def _listening(pod: Pod) -> list[int]:
    """The ports a pod listens on: its containers' declared ones, and for Ray the random ones."""
    declared = [p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])]
    return declared + (list(RAY_PORTS) if pod.role in ("ray-head", "ray-worker") else [])


def _container_port(pod: Pod) -> int:
    return pod.spec["containers"][0].get("ports", [{"containerPort": 0}])[0]["containerPort"]


def _may_connect(src: Pod, dst: Pod, port: int) -> bool:
    """What each pod needs to open to another, and nothing more."""
    same_cluster = src.cluster is not None and src.cluster == dst.cluster
    if src.role in ("ray-head", "ray-worker"):
        return dst.role == "mlflow" or (dst.role in ("ray-head", "ray-worker") and same_cluster)
    if src.role == "submitter":
        return dst.role == "ray-head" and same_cluster and port == DASHBOARD_PORT
    return src.role == "mlflow" and dst.role == "postgres"


def _range_problems(policies: list[Doc], pods: list[Pod], store_port: int | None) -> list[str]:
    """Address ranges (ipBlock) are for what has no pod: MLflow's artifact store and, for an
    autoscaling head, the Kubernetes API; on those ports only, and present where needed."""
    problems = []
    for pod in pods:
        needs = {"the artifact store": {store_port}} if pod.role == "mlflow" and store_port else {}
        needs |= {"the Kubernetes API": set(KUBE_API_PORTS)} if pod.autoscaler is not None else {}
        allowed = set().union(*needs.values())
        ranges = list(_ranges(policies, pod))
        for name, cidr, ports in ranges:
            if ports is None or not ports <= allowed:
                problems.append(f"{pod.where}: {name} opens {cidr} on {sorted(ports or []) or 'every port'}")
        for what, wanted in needs.items():
            if not any(ports and ports & wanted for _, _, ports in ranges):
                problems.append(
                    f"{pod.where} cannot reach {what}: no address range (ipBlock) on {sorted(wanted)}"
                )
    return problems


def _ranges(policies: list[Doc], pod: Pod) -> Iterator[tuple[str, str, set[int] | None]]:
    for policy in policies:
        if "Egress" in _types(policy) and selects(policy["spec"]["podSelector"], pod.labels):
            for rule in policy["spec"].get("egress") or []:
                for peer in rule.get("to") or []:
                    if "ipBlock" in peer:
                        yield (
                            f"NetworkPolicy/{policy['metadata']['name']}",
                            peer["ipBlock"].get("cidr"),
                            _ports(rule),
                        )


def _ports(rule: Doc) -> set[int] | None:
    if not rule.get("ports") or any("port" not in p or not isinstance(p["port"], int) for p in rule["ports"]):
        return None
    return {n for p in rule["ports"] for n in range(p["port"], p.get("endPort", p["port"]) + 1)}
