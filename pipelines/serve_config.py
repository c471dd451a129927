"""The Serve app's configuration (``recompose serve``, ``infra/serve.yaml``): one frozen dataclass tree.

Defaults are the embedded default: one CPU replica of the model on 127.0.0.1:8000, batching on,
no authentication. ``configs/serve-*.yaml`` and ``infra/serve.yaml`` hold the other setups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.config import nested

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ModelDeployment:
    """The deployment holding the pipeline: one replica per GPU on a cluster."""

    num_replicas: int = 1  # fixed replica count (when autoscaling is off)
    autoscaling: bool = False  # Ray Serve autoscaling between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0  # autoscaling target per replica
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 1 on a GPU node: the pipeline and extractors run on it
    device: Device = "auto"  # auto: CUDA when the replica has a GPU
    # Requests a replica works on at once; must be >= batching.max_batch_size for batches to fill.
    max_ongoing_requests: int = 16
    # Requests waiting for a replica before new ones are refused (503/429 + Retry-After); -1: no limit.
    max_queued_requests: int = 64

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                "model.num_replicas must be >= 1 and 0 <= min_replicas <= max_replicas (>= 1), got "
                f"{self.num_replicas}, {self.min_replicas}, {self.max_replicas}"
            )
        if self.num_cpus < 0 or self.num_gpus < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("model.num_cpus and num_gpus must be >= 0, target_ongoing_requests > 0")
        if self.max_ongoing_requests < 1 or (self.max_queued_requests < 1 and self.max_queued_requests != -1):
            raise ValueError(
                "model.max_ongoing_requests must be >= 1 and max_queued_requests >= 1 or -1 (no limit)"
            )


@dataclass(frozen=True)
class IngressDeployment:
    """The FastAPI deployment: validates, decodes uploads, forwards to the model; cheap."""

    num_replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 128

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.num_cpus < 0 or self.max_ongoing_requests < 1:
            raise ValueError("ingress.num_replicas and max_ongoing_requests must be >= 1, num_cpus >= 0")


@dataclass(frozen=True)
class Batching:
    """``@serve.batch`` on the model: compatible requests share one sampling run."""

    enabled: bool = True
    max_batch_size: int = 8  # samples (num_images summed), not requests
    # How long a request arriving at an idle model waits for company; requests arriving while
    # the model is busy are merged anyway (serve_model.ComposerServer._batched).
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("batching.max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; beyond them it gets a 413 or 422 and the model is not called."""

    max_body_bytes: int = 32 * 2**20  # whole request body (413)
    max_image_bytes: int = 10 * 2**20  # one encoded image (413)
    max_image_pixels: int = 4096 * 4096  # one decoded image, width × height (413)
    max_images: int = 8  # reference images in one request
    max_steps: int = 200
    max_num_images: int = 8
    max_text_chars: int = 1000
    max_guidance: float = 50.0  # |weight| of any guidance term

    def __post_init__(self) -> None:
        values = (self.max_body_bytes, self.max_image_bytes, self.max_image_pixels, self.max_images)
        if min(values) < 1 or min(self.max_steps, self.max_num_images, self.max_text_chars) < 1:
            raise ValueError("limits must all be >= 1")
        if self.max_guidance <= 0:
            raise ValueError("limits.max_guidance must be > 0")


@dataclass(frozen=True)
class Auth:
    """Optional bearer-token authentication of ``/v1/*`` (``/`` and ``/healthz`` stay open)."""

    # The environment variable holding the token (set it in the runtime env / a Kubernetes
    # secret); the token itself never goes into a config file or the Serve config.
    token_env: str | None = None


@dataclass(frozen=True)
class Backpressure:
    """The answer when the model's queue is full (``model.max_queued_requests``)."""

    status_code: Literal[503, 429] = 503
    retry_after_s: float = 1.0  # the Retry-After header, rounded up to whole seconds

    def __post_init__(self) -> None:
        if self.retry_after_s < 0:
            raise ValueError("backpressure.retry_after_s must be >= 0")


@dataclass(frozen=True)
class ServeConfig:
    model: str = ""  # a saved pipeline directory or models:/<name>/<version> (MLflow)
    host: str = "127.0.0.1"  # the Serve HTTP proxy's address; 0.0.0.0 only behind an auth proxy
    port: int = 8000
    name: str = "recompose"  # the Serve application name
    route_prefix: str = "/"
    default_steps: int = 50
    default_guidance: str = "3"
    model_deployment: ModelDeployment = nested(ModelDeployment)
    ingress: IngressDeployment = nested(IngressDeployment)
    batching: Batching = nested(Batching)
    limits: Limits = nested(Limits)
    auth: Auth = nested(Auth)
    backpressure: Backpressure = nested(Backpressure)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: a saved pipeline directory or an MLflow model URI")
        if not (0 < self.port < 65536):
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not (1 <= self.default_steps <= self.limits.max_steps):
            raise ValueError(f"default_steps must be in 1..limits.max_steps, got {self.default_steps}")
