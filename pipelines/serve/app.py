"""The Serve app: a FastAPI ingress and a model deployment (Ray Serve).

    HTTP -> Ingress (FastAPI: auth, body limit, validation, image decoding; serves the web page)
         -> ComposerServer (the pipeline: extractors, @serve.batch'ed sampling; GPUs, replicas)

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``): ``POST /v1/decompose``, ``POST
/v1/generate``, ``POST /v1/edit``, ``GET /v1/model``, ``GET /healthz``, the page at ``/`` and its
example images at ``/examples/`` (``examples.json`` and the PNGs it lists; anything else is a 404).
Every refusal is a 4xx ``{"error": {"code", "message", "field"}}`` decided in the ingress, before
the model is called; a full model queue is a 503 (or 429) with ``Retry-After``; a failure of the
server is a 500 (or 503) whose body carries an error ``id`` and no exception text: the details are
in the log under that id. A POST must be ``Content-Type: application/json`` (415 otherwise), so a
cross-site HTML form cannot trigger a generation; CORS headers are sent only to the origins in
``cors_origins``. Decoding bodies and images, and encoding the answer's PNGs, run in threads:
the event loop stays free for health checks and other requests.

``build_app(config)`` returns the application for ``serve.run``; ``app_builder(args)`` is the
import path for ``serve run`` / ``serve deploy`` config files (``infra/serve.yaml``).
"""

import asyncio
import dataclasses
import hmac
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from pipelines.config import from_dict, to_dict
from pipelines.serve.api import (
    ApiError,
    DecomposeBody,
    EditBody,
    GenerateBody,
    Job,
    ModelInfo,
    Refused,
    UpscaleBody,
    new_error_id,
    validation_error,
)
from pipelines.serve.config import ServeConfig
from pipelines.serve.decoding import Decoder, png_b64
from pipelines.serve.examples import EXAMPLES_DIR, MANIFEST, example_files
from pipelines.serve.model import ComposerServer

PAGE = Path(__file__).parent / "static" / "index.html"
API_VERSION = "v1"
log = logging.getLogger(__name__)


# -- the ingress ---------------------------------------------------------------------------------------
app = FastAPI(
    title="recompose",
    version=API_VERSION,
    description="Composer (arXiv 2302.09778): generate and edit images from any mix of conditions.",
)


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request bodies, which the routes read themselves (to cap their
    size before parsing) and so declare through ``openapi_extra``."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (GenerateBody, EditBody, DecomposeBody):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def _body_doc(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), e.status, headers=headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    """Anything else the ingress raised: a 500 with an error id; the details go to the log only."""
    return JSONResponse(_internal(e, f"{request.method} {request.url.path}").body(), 500)


def _internal(e: BaseException, what: str, status: int = 500, code: str = "internal_error") -> ApiError:
    eid = new_error_id()
    log.error("%s failed [error id %s]", what, eid, exc_info=(type(e), e, e.__traceback__))
    message = "the server failed on this request" if status == 500 else "the model deployment is unavailable"
    return ApiError(status, code, f"{message} (error id {eid})", error_id=eid)


@app.middleware("http")
async def _cors(request: Request, call_next: Any) -> Response:
    """CORS for the origins in ``cors_origins`` only (``app.state.cors_origins``, set by the
    ingress); any other origin gets no CORS header, so browsers keep cross-site pages out."""
    origin = request.headers.get("origin")
    allowed = origin is not None and origin in getattr(request.app.state, "cors_origins", ())
    if allowed and request.method == "OPTIONS" and "access-control-request-method" in request.headers:
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
        return Response(status_code=204, headers=headers)
    response = await call_next(request)
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    err = validation_error(list(e.errors()))
    return JSONResponse(err.body(), err.status)


class _Overloaded(ApiError):
    def __init__(self, cfg: Any):
        super().__init__(cfg.status_code, "overloaded", "the model's queue is full; retry later")
        self.retry_after = str(max(1, math.ceil(cfg.retry_after_s)))


@app.exception_handler(_Overloaded)
async def _overloaded(request: Request, e: _Overloaded) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers={"Retry-After": e.retry_after})


# Defined before Ingress: @serve.ingress pickles the class with the globals it finds then.
def _origins(job: Job) -> dict[str, str]:
    """condition -> where the request gave it: "image <name>", "map", "text", "colors", "mask"."""
    origins = {name: f"image {ref}" for name, ref in job.references.items()}
    origins.update({n: "map" for n in job.maps})
    if job.text is not None:
        origins["caption"] = "text"
    if job.palette is not None:
        origins["palette"] = "colors"
    if job.kind == "edit" and job.mask is not None:
        origins["mask"] = "mask"
    if job.prior:
        origins["semantics"] = "prior"
    return origins


def _decode_process() -> None:
    """A decode process yields the CPU to the replica's event loop (nice +10): health checks and
    small requests stay quick while big uploads decode."""
    import os

    os.nice(10)


def _warm() -> None:
    """Imports what a decode process needs, before the first upload does."""
    import pipelines.data.decomposer  # noqa: F401
    import pipelines.serve.decoding  # noqa: F401


def _decode_request(d: Decoder, kind: str, body: Any) -> Any:
    """``Decoder.generate`` / ``edit`` / ``decompose`` of ``body`` (run in a decode process)."""
    return getattr(d, kind)(body)


def _decompose_answer(d: Decoder, image: Any, reps: dict[str, Any]) -> dict[str, Any]:
    """The /v1/decompose answer: each representation with its PNGs."""
    out = {}
    for name, rep in reps.items():
        r = {k: v for k, v in rep.items() if k not in ("picture", "map")}
        if "picture" in rep:
            r["png"] = png_b64(rep["picture"])
        if "map" in rep:
            r["map_png"] = png_b64(rep["map"])
        out[name] = r
    unavailable = {n: ok for n, ok in d.info.decomposable.items() if ok is not True}
    return {
        "resolution": d.dec.resolution,
        "image_png": png_b64(image),
        "representations": out,
        "unavailable": unavailable,
    }


def _sample_answer(job: Job, res: Any, t0: float) -> dict[str, Any]:
    """The /v1/generate and /v1/edit answer: PNGs, what was used, how it was batched."""
    conditions = {
        name: {"from": origin, "png": png_b64(res.pictures[name]) if name in res.pictures else None}
        for name, origin in sorted(_origins(job).items())
    }
    out = {
        "images": [png_b64(im) for im in res.images],
        "seed": job.seed,
        "steps": job.steps,
        "num_images": job.num_images,
        "resolution": int(res.images.shape[1]),
        "guidance": {"text": job.guidance, **res.guidance},
        "threshold": res.threshold,
        "conditions": conditions,
        "batch": res.batch,
        "timings_s": {**res.timings_s, "total": round(time.perf_counter() - t0, 4)},
    }
    if job.kind == "edit":
        out["invert_guidance"] = {"text": job.invert_guidance, **res.invert_guidance}
        out["source_png"] = png_b64(job.source)
    if job.outpaint is not None:
        out["outpaint"] = job.outpaint
        out["source_png"] = png_b64(job.source)  # the canvas: the image, its edges repeated
    if job.paint:
        out["paint"] = {"weight": job.paint_weight, "phrases": sorted(job.paint)}
    if res.stages:  # a cascade: each stage's side, steps, guidance and time
        out["stages"] = res.stages
    if res.semantics is not None:  # what the prior sampled from the caption
        out["prior"] = {"guidance": job.prior_guidance, "steps": job.prior_steps, "semantics": res.semantics}
    return out


def _upscale_answer(job: Job, res: Any, t0: float) -> dict[str, Any]:
    """The /v1/upscale answer: PNGs of the samples, the input as the model got it, and bicubic."""
    side = int(res.images.shape[1])
    return {
        "images": [png_b64(im) for im in res.images],
        "input_png": png_b64(job.source),
        "bicubic_png": png_b64(res.bicubic),
        "seed": job.seed,
        "steps": job.steps,
        "num_images": job.num_images,
        "factor": side // int(job.source.shape[0]),
        "resolution": side,
        "guidance": {"text": job.guidance, **res.guidance},
        "stages": res.stages,
        "timings_s": {**res.timings_s, "total": round(time.perf_counter() - t0, 4)},
    }


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, model: Any, config: dict[str, Any]):
        self.config = from_dict(ServeConfig, config)
        self.model = model
        self.token = None
        if self.config.auth.token_env:
            self.token = os.environ.get(self.config.auth.token_env)
            if not self.token:
                raise RuntimeError(
                    f"auth.token_env={self.config.auth.token_env!r} but that environment variable is empty"
                )
        self._decoder: Decoder | None = None
        self._examples: dict[str, Path] | None = None
        self._pool: ProcessPoolExecutor | None = None
        if self.config.ingress.decode_processes:
            # spawn, not fork: this process runs Ray's threads. Started now, so that the first
            # upload does not wait for Python to start; at a lower priority (``_decode_process``).
            self._pool = ProcessPoolExecutor(
                self.config.ingress.decode_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_decode_process,
            )
            for _ in range(self.config.ingress.decode_processes):
                self._pool.submit(_warm)
        app.state.cors_origins = tuple(self.config.cors_origins)

    def _example_files(self) -> dict[str, Path]:
        """{name: path} of what ``/examples/`` serves: the manifest and the PNGs it lists."""
        if self._examples is None:
            try:
                files = example_files(EXAMPLES_DIR)
            except (OSError, ValueError, KeyError, TypeError):  # no or a broken manifest: serve nothing
                files = {}
            self._examples = {n: p for n, p in files.items() if n == MANIFEST or n.endswith(".png")}
        return self._examples

    async def _decode(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` off the event loop: in the decode processes (base64 and image decoding
        hold the GIL, and threads of this process would still delay the loop), else a thread."""
        if self._pool is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _model_info(self) -> ModelInfo:
        return await self._call(self.model.info)

    async def decoder(self) -> Decoder:
        """Built from the model's settings on first use (the model may still be loading at start):
        uploads are decoded here exactly as the model's training shards were decoded."""
        if self._decoder is None:
            from pipelines.data.decomposer import ImageDecomposer

            info = await self._model_info()
            dec = ImageDecomposer(
                info.decompose_settings, info.resolution, info.caption_encoder, info.semantics_encoder
            )
            defaults = {
                "steps": self.config.default_steps,
                "guidance": self.config.default_guidance,
                "upsampler_steps": self.config.default_upsampler_steps,
            }
            self._decoder = Decoder(dec, info, self.config.limits, defaults)
        return self._decoder

    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "a valid `Authorization: Bearer <token>` header is required")

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        """The JSON body as ``model``: 415 unless it is sent as ``application/json``, 413 past
        ``limits.max_body_bytes`` (by Content-Length, or while it streams in), 400 if it is not
        JSON, 422 naming the first bad field. Parsed in a thread (bodies go up to tens of MB)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"the body must be sent as Content-Type: application/json, not {media or 'nothing'!r}",
            )
        limit = self.config.limits.max_body_bytes
        too_large = ApiError(413, "body_too_large", f"the body is over limits.max_body_bytes={limit}")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        try:
            return await asyncio.to_thread(model.model_validate_json, bytes(data))
        except ValidationError as e:
            raise validation_error(list(e.errors())) from None

    async def _call(self, method: Any, *args: Any) -> Any:
        """``await method.remote(*args)``; a full queue or a missing replica become 503/429 answers."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            res = await method.remote(*args)
        except BackPressureError:
            raise _Overloaded(self.config.backpressure) from None
        except DeploymentUnavailableError as e:
            raise _internal(e, "calling the model deployment", 503, "unavailable") from None
        except Exception as e:  # noqa: BLE001 - a replica that died or raised: details to the log only
            raise _internal(e, "calling the model deployment") from None
        if isinstance(res, Refused):
            raise ApiError(res.status, res.code, res.message, error_id=res.error_id)
        return res

    # -- routes -------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/examples/{name}", include_in_schema=False)
    async def example(self, name: str) -> Response:
        """The page's example images: only the manifest and the files it lists (no auth, like ``/``)."""
        path = self._example_files().get(name)
        if path is None or not path.is_file():
            raise ApiError(404, "not_found", "no such example file")
        media = "application/json" if name == MANIFEST else "image/png"
        return Response(
            path.read_bytes(), media_type=media, headers={"Cache-Control": "public, max-age=3600"}
        )

    @app.get("/healthz", summary="200 when the model deployment answers")
    async def healthz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self._model_info(), timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means not healthy; why goes to the log only
            log.warning("health check: the model deployment does not answer (%s: %s)", type(e).__name__, e)
            return JSONResponse({"status": "unavailable"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/model", summary="the loaded model: representations, sizes, limits")
    async def model_info(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        info = await self._model_info()
        limits = to_dict(self.config.limits)
        b = self.config.batching
        return {
            **{k: v for k, v in dataclasses.asdict(info).items() if k != "decompose_settings"},
            "limits": limits,
            "defaults": {
                "steps": self.config.default_steps,
                "guidance": self.config.default_guidance,
                "scheduler": "ddim",
            },
            "batching": to_dict(b),
            "auth": self.token is not None,
        }

    @app.post(
        "/v1/decompose",
        summary="an image -> its representations, with preview PNGs",
        openapi_extra=_body_doc(DecomposeBody),
    )
    async def decompose(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        body = await self._body(request, DecomposeBody)
        d = await self.decoder()
        image, names, text = await self._decode(_decode_request, d, "decompose", body)
        reps = await self._call(self.model.decompose, image, names, text)
        return await asyncio.to_thread(_decompose_answer, d, image, reps)

    @app.post(
        "/v1/generate", summary="images from any mix of conditions", openapi_extra=_body_doc(GenerateBody)
    )
    async def generate(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        body = await self._body(request, GenerateBody)
        d = await self.decoder()
        return await self._sample(await self._decode(_decode_request, d, "generate", body))

    @app.post(
        "/v1/edit",
        summary="bidirectional guidance: change some conditions of a source image",
        openapi_extra=_body_doc(EditBody),
    )
    async def edit(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        body = await self._body(request, EditBody)
        d = await self.decoder()
        return await self._sample(await self._decode(_decode_request, d, "edit", body))

    @app.post(
        "/v1/upscale",
        summary="super-resolution of an image by the served cascade's upsamplers",
        openapi_extra=_body_doc(UpscaleBody),
    )
    async def upscale(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        body = await self._body(request, UpscaleBody)
        d = await self.decoder()
        job = await self._decode(_decode_request, d, "upscale", body)
        t0 = time.perf_counter()
        res = await self._call(self.model.upscale, job)
        return await asyncio.to_thread(_upscale_answer, job, res, t0)

    async def _sample(self, job: Job) -> dict[str, Any]:
        """The /v1/generate and /v1/edit answer: PNGs, what was used, how it was batched."""
        t0 = time.perf_counter()
        res = await self._call(self.model.generate, job)
        return await asyncio.to_thread(_sample_answer, job, res, t0)


# -- building the application ---------------------------------------------------------------------------
def build_app(config: ServeConfig):
    """The bound application (ingress -> model) with replicas, resources and limits from ``config``."""
    data = to_dict(config)
    m, ing = config.model_deployment, config.ingress
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
    }
    if m.autoscaling:
        model_options["autoscaling_config"] = {
            "min_replicas": m.min_replicas,
            "max_replicas": m.max_replicas,
            "target_ongoing_requests": m.target_ongoing_requests,
        }
    else:
        model_options["num_replicas"] = m.num_replicas
    model = ComposerServer.options(**model_options).bind(data)
    return Ingress.options(
        num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
    ).bind(model, data)


def app_builder(args: dict[str, Any]):
    """``serve run pipelines.serve.app:app_builder model=…`` and ``import_path`` in Serve configs.

    ``args``: the ``ServeConfig`` fields (nested sections as mappings), plus ``config``: a YAML file
    loaded first.
    """
    from pipelines.config import load_config

    args = dict(args)
    path = args.pop("config", None)
    flat = {k: v for k, v in args.items() if not isinstance(v, dict)}
    cfg = load_config(ServeConfig, path, flat, ())
    if any(isinstance(v, dict) for v in args.values()):
        merged = to_dict(cfg)
        for k, v in args.items():
            if isinstance(v, dict):
                merged[k] = {**merged[k], **v}
        cfg = from_dict(ServeConfig, merged)
    return build_app(cfg)
