"""The Serve app's configuration (``recompose serve``, ``infra/serve.yaml``): one frozen config tree.

Defaults are the embedded default: one CPU replica of the model on 127.0.0.1:8000, batching on,
no authentication. ``configs/serve-*.yaml`` and ``infra/serve.yaml`` hold the other setups.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.config import Config, added, nested, resource
from pipelines.data.decode import IMAGE_FORMATS, check_formats
from pipelines.diffusion.loading import REFERENCE_MODEL

Device = Literal["auto", "cpu", "cuda"]


class ModelDeployment(Config):
    """The deployment holding the pipeline: one replica per GPU on a cluster."""

    num_replicas: int = Field(1, ge=1)  # fixed replica count (when autoscaling is off)
    autoscaling: bool = False  # Ray Serve autoscaling between min_replicas and max_replicas
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)  # autoscaling target per replica
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # 1 on a GPU node: the pipeline and extractors run on it
    device: Device = "auto"  # auto: CUDA when the replica has a GPU
    # Requests a replica works on at once; must be >= batching.max_batch_size for batches to fill.
    max_ongoing_requests: int = Field(16, ge=1)
    # Requests waiting for a replica before new ones are refused (503/429 + Retry-After); -1: no limit.
    max_queued_requests: int = Field(64, ge=-1)

    @model_validator(mode="after")
    def _check(self) -> ModelDeployment:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be >= 1, or -1 for no limit")
        return self


class IngressDeployment(Config):
    """The FastAPI deployment: validates, decodes uploads, forwards to the model; cheap."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    # Processes per ingress replica that decode uploads (base64, images, resizing), so that big
    # uploads never hold up the replica's event loop; 0: decode in threads of the replica.
    decode_processes: int = resource(2, ge=0)


class Batching(Config):
    """``@serve.batch`` on the model: compatible requests share one sampling run."""

    enabled: bool = True
    max_batch_size: int = Field(8, ge=1)  # samples (num_images summed), not requests
    # How long a request arriving at an idle model waits for company; requests arriving while
    # the model is busy are merged anyway (serve_model.ComposerServer._batched).
    batch_wait_timeout_s: float = Field(0.01, ge=0)


class Limits(Config):
    """What a request may ask for; beyond them it gets a 413 or 422 and the model is not called."""

    max_body_bytes: int = Field(32 * 2**20, ge=1)  # whole request body (413)
    max_image_bytes: int = Field(10 * 2**20, ge=1)  # one encoded image (413)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # one decoded image, width × height (413)
    max_images: int = Field(8, ge=1)  # reference images in one request
    max_steps: int = Field(200, ge=1)
    max_num_images: int = Field(8, ge=1)
    max_text_chars: int = Field(1000, ge=1)
    max_guidance: float = Field(50.0, gt=0)  # |weight| of any guidance term
    # Image formats an upload may be in (Pillow format names); anything else is a 422
    # unsupported_image_format before any decoder runs (EPS, for one, would start Ghostscript).
    image_formats: tuple[str, ...] = added(IMAGE_FORMATS)

    @model_validator(mode="after")
    def _check(self) -> Limits:
        check_formats(self.image_formats, "limits.image_formats")
        return self


class Auth(Config):
    """Optional bearer-token authentication of ``/v1/*`` (``/`` and ``/healthz`` stay open)."""

    # The environment variable holding the token (set it in the runtime env / a Kubernetes
    # secret); the token itself never goes into a config file or the Serve config.
    token_env: str | None = None


class Backpressure(Config):
    """The answer when the model's queue is full (``model.max_queued_requests``)."""

    status_code: Literal[503, 429] = 503
    retry_after_s: float = Field(1.0, ge=0)  # the Retry-After header, rounded up to whole seconds


class ServeConfig(Config):
    # a saved pipeline directory, models:/<name>/<version> (MLflow), or the shipped reference model
    model: str = REFERENCE_MODEL
    host: str = "127.0.0.1"  # the Serve HTTP proxy's address; 0.0.0.0 only behind an auth proxy
    # Serving on a non-loopback host without auth.token_env is refused unless this is set
    # (`recompose serve --allow-unauthenticated`): anyone who reaches the port could generate.
    allow_unauthenticated: bool = added(False)
    # Browser origins allowed to call the API from their pages (CORS); none by default.
    cors_origins: tuple[str, ...] = added(())
    port: int = Field(8000, ge=1, le=65535)
    name: str = "recompose"  # the Serve application name
    route_prefix: str = Field("/", pattern=r"^/")
    default_steps: int = Field(50, ge=1)
    default_guidance: str = "3"
    default_upsampler_steps: int = added(20, ge=1)  # a cascade's upsamplers, and /v1/upscale
    resolution: int | None = added(None, ge=1)  # a cascade: the output side (None: its last stage)
    model_deployment: ModelDeployment = nested(ModelDeployment)
    ingress: IngressDeployment = nested(IngressDeployment)
    batching: Batching = nested(Batching)
    limits: Limits = nested(Limits)
    auth: Auth = nested(Auth)
    backpressure: Backpressure = nested(Backpressure)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not self.model:
            raise ValueError(
                f"model must not be empty: a saved pipeline directory, an MLflow model URI or {REFERENCE_MODEL}"
            )
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin like https://app.example.com "
                    "(scheme and host, no path, no wildcard)"
                )
        if not (1 <= self.default_steps <= self.limits.max_steps):
            raise ValueError(f"default_steps must be in 1..limits.max_steps, got {self.default_steps}")
        return self

    def unauthenticated_exposure(self) -> str | None:
        """Why serving this config would expose the API without authentication, or None."""
        import ipaddress

        if self.auth.token_env or self.allow_unauthenticated:
            return None
        host = self.host.strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return None
        return (
            f"host {self.host!r} is not a loopback address and no auth.token_env is set: anyone who "
            "can reach the port could generate and edit images. Set auth.token_env (a bearer token), "
            "serve on 127.0.0.1 behind an authenticating proxy, or pass --allow-unauthenticated "
            "(config: allow_unauthenticated: true) if that is really meant"
        )
