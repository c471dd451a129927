"""A real local Ray Serve for tests: ``serve_cluster()`` (Ray + Serve on a free port),
``run_app`` (one recompose application under a route prefix), ``serve_app`` (both, one app)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from pipelines.config import from_dict
from pipelines.serve.config import ServeConfig

# Small reservations so two apps (ingress + model each) fit in the 2-CPU test cluster.
TEST_RESOURCES = {"model_deployment": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_cluster(num_cpus: int = 2) -> Iterator[int]:
    """A local Ray with Serve's HTTP proxy on 127.0.0.1:<free port>; yields the port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_app(port: int, model_dir: str, name: str, route_prefix: str, **overrides: Any) -> str:
    """Deploys a recompose app (``ServeConfig`` fields as ``overrides``, sections as dicts) and
    returns its base URL, ending with '/'."""
    from ray import serve

    from pipelines.serve.app import build_app

    data = _merge(TEST_RESOURCES, overrides)
    cfg = from_dict(
        ServeConfig, {"model": model_dir, "port": port, "name": name, "route_prefix": route_prefix, **data}
    )
    serve.run(build_app(cfg), name=name, route_prefix=route_prefix)
    return f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}/"


@contextlib.contextmanager
def serve_app(
    model_dir: str, name: str = "web", route_prefix: str = "/web", **overrides: Any
) -> Iterator[str]:
    """One app on its own local Ray + Serve; yields its base URL (ending with '/')."""
    with serve_cluster() as port:
        yield run_app(port, model_dir, name, route_prefix, **overrides)
