"""The Serve app's model deployment: one ``ComposerPipeline`` per replica (Ray Serve).

``ComposerServer`` holds the pipeline and its ``ImageDecomposer`` (the training shards'
extractors and settings), decomposes uploaded images and samples. Generation requests go
through ``@serve.batch``: compatible requests (``PreparedRequest.compatible_key`` plus steps,
scheduler and threshold) share one ``ComposerPipeline.sample_batch`` run. The ingress
(``pipelines/serve/app.py``) has checked every request before it gets here.
"""

import asyncio
import collections
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from pipelines.config import from_dict
from pipelines.serve.api import Job, ModelInfo, Refused, Sampled, new_error_id
from pipelines.serve.config import ServeConfig

if TYPE_CHECKING:  # the ingress imports this module too; it never loads torch
    from pipelines.diffusion.cascade import StageInputs
    from pipelines.diffusion.pipeline import ComposerOutput
    from pipelines.diffusion.requests import PreparedRequest


log = logging.getLogger(__name__)

# Test seam (tests/serve/test_hardening.py): when this environment variable is set in the
# replica, a job whose caption is exactly its value fails while its conditions are extracted with
# a RuntimeError, as a crashing extractor (OpenCV, PIL, a CUDA kernel) would.
FAULT_TEXT_ENV = "RECOMPOSE_SERVE_TEST_FAULT_TEXT"

# A sampling failure with one of these in its message means the device is gone (not an out-of-
# memory or a bad input): the replica can no longer sample and its health check fails from then on.
_DEVICE_LOST = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "NCCL error")


# Defined before the deployment: Ray pickles its class with the globals it finds then.
def _failed(e: BaseException, what: str) -> Refused:
    """A job's own failure as its answer: 422 when its input caused it (``ValueError``, what the
    pipeline's checks raise), else 500 with an error id; the details go to the replica's log."""
    if isinstance(e, ValueError):
        return Refused(422, "invalid_request", str(e))
    eid = new_error_id()
    log.error("%s failed [error id %s]", what, eid, exc_info=(type(e), e, e.__traceback__))
    return Refused(500, "internal_error", f"the server failed on this request (error id {eid})", eid)


def _device_lost(e: BaseException) -> bool:
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _DEVICE_LOST)


def _palette_representation(hist: np.ndarray) -> dict[str, Any]:
    """/v1/decompose's palette: its picture, the (156,) histogram, and its strongest colours as
    hex with their share of those colours (up to 8, from the top decile of bins)."""
    from pipelines.conditions.palette import bin_colours, render_palette

    top = np.argsort(-hist)[:8]
    top = top[hist[top] >= np.percentile(hist, 90)]
    colours = bin_colours()[top]
    return {
        "picture": render_palette(hist),
        "values": hist.tolist(),
        "colors": [
            {"hex": "#" + "".join(f"{int(v):02x}" for v in c), "weight": float(hist[i] / hist[top].sum())}
            for c, i in zip(colours, top, strict=True)
        ],
    }


def _sampled(
    job: Job,
    conditions: dict[str, Any],
    out: "ComposerOutput",
    batch: dict[str, int],
    timings: dict[str, float],
    stages: list[dict[str, Any]] | None = None,
) -> Sampled:
    """One job's share of a sampling run, with the pictures of the conditions it was given (at
    the output side: a cascade's last stage's)."""
    from pipelines.diffusion.pictures import condition_pictures

    refs = {"semantics": job.from_image["semantics"]} if "semantics" in job.from_image else {}
    return Sampled(
        images=out.images,
        guidance=out.guidance,
        invert_guidance=out.invert_guidance,
        threshold=out.threshold,
        pictures=condition_pictures(conditions, job.source, job.mask, refs),
        batch=batch,
        timings_s=timings,
        stages=stages,
        semantics=None if job.semantics is None else [float(v) for v in job.semantics],
    )


@serve.deployment(name="ComposerServer")
class ComposerServer:
    """Holds one ``ComposerPipeline`` and its ``ImageDecomposer``; model work runs in a thread so
    the replica keeps answering (health checks, batching) while the model works.

    Every job's failure stays its own: a job whose extraction or sampling raises gets its own
    ``Refused`` (422 for its input, 500 with an error id otherwise) while the jobs it was batched
    with get their images. Model work is never tied to one caller: a client that disconnects
    (its call cancelled) leaves the run it was part of, and every other job in it, to finish.
    """

    def __init__(self, config: dict[str, Any]):
        from pipelines.data.decomposer import ImageDecomposer
        from pipelines.diffusion.loading import load_cascade, model_label, resolve_device

        self.config = from_dict(ServeConfig, config)
        device = resolve_device(self.config.model_deployment.device)
        # A pipeline is a one-stage cascade; requests are decoded at the last stage's side and
        # brought to each stage's (``_stage_inputs``).
        self.cascade = load_cascade(self.config.model, device)
        if self.config.resolution is not None:  # the API runs the cascade up to this side
            self.cascade.stages = self.cascade.upto(self.config.resolution)
        for stage in self.cascade.stages:
            stage.set_progress_bar_config(disable=True)
        self.base, self.pipe = self.cascade.base, self.cascade.stages[-1]
        self.device = device
        self.decs = [ImageDecomposer.for_pipeline(p, device) for p in self.cascade.stages]
        self.dec = self.decs[-1]
        self.decomposable = self._decomposable()
        self.name, self.version = model_label(self.config.model)
        self.stats = {"jobs": 0, "batches": 0, "decompositions": 0, "largest_batch": 0}
        self.lock = asyncio.Lock()  # one model call at a time per replica (batching or not)
        # Jobs waiting for the model, oldest first; one worker task (``_work``) takes them.
        self.pending: collections.deque[tuple[Job, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.lost: str | None = None  # why the replica can no longer sample (its device is gone)
        self._fault_text = os.environ.get(FAULT_TEXT_ENV) or None
        b = self.config.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    def _decomposable(self) -> dict[str, bool | str]:
        """Which representations can be taken from an image with this pipeline's settings."""
        from pipelines.conditions import EXTRACTED_NAMES, ExtractorUnavailable

        cfg = self.base.unet.config
        out: dict[str, bool | str] = {}
        for name in EXTRACTED_NAMES:
            if (name == "caption" and cfg.caption_encoder in ("trainable", "base")) or (
                name == "semantics" and cfg.semantics_encoder == "trainable"
            ):
                out[name] = True  # the model (or a base's text encoder) encodes the text / the image itself
                continue
            try:
                self.dec.extractor(name)
                out[name] = True
            except ExtractorUnavailable as e:
                out[name] = str(e)
        return out

    def info(self) -> ModelInfo:

        cfg = self.base.unet.config
        r = self.pipe.image_size
        from pipelines.diffusion.cascade import upscale_factors

        factors = upscale_factors(self.cascade.stages[1:])
        sizes = {
            "caption": "text"
            if cfg.caption_encoder in ("trainable", "base")
            else f"{cfg.caption_encoder} embeddings",
            "semantics": "image" if cfg.semantics_encoder == "trainable" else f"vector ({cfg.semantics_dim})",
            "palette": "156-bin histogram",
            **{m: f"{r}x{r} map" for m in ("sketch", "instances", "depth", "intensity")},
            "mask": f"{r}x{r} mask + source image",
        }
        return ModelInfo(
            model=self.name,
            version=self.version,
            resolution=r,
            conditions=list(sizes),
            inputs=sizes,
            decomposable=self.decomposable,
            caption_encoder=cfg.caption_encoder,
            semantics_encoder=cfg.semantics_encoder,
            decompose_settings=dict(self.pipe.config.decompose),
            device=self.device,
            stats=dict(self.stats),
            stages=self.cascade.resolutions if factors else [],
            upscale_factors=factors,
            prior=self.cascade.prior is not None,
            experts=[] if self.base.ensemble is None else self.base.ensemble.describe(),
        )

    async def _exclusive(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a thread while holding the model lock. Shielded: if the caller is
        cancelled the lock is still held until the thread is done, so model work never overlaps."""

        async def run() -> Any:
            async with self.lock:
                return await asyncio.to_thread(fn, *args)

        return await asyncio.shield(asyncio.ensure_future(run()))

    # -- decompose ----------------------------------------------------------------------------------
    async def decompose(
        self, image: np.ndarray, names: list[str], text: str | None
    ) -> dict[str, Any] | Refused:
        try:
            return await self._exclusive(self._decompose, image, names, text)
        except Exception as e:  # noqa: BLE001 - this request's failure is its own answer
            return _failed(e, "decompose")

    def _decompose(self, image: np.ndarray, names: list[str], text: str | None) -> dict[str, Any]:
        from pipelines.data.preview import colourize_instances

        self.stats["decompositions"] += 1
        out: dict[str, Any] = {}
        for name in names:
            values = self.dec.decompose(image, [name], text)
            rep: dict[str, Any] = {}
            if name == "caption":
                rep["text"] = text
            elif name == "semantics":
                rep["picture"] = image  # what the semantics are taken from
                if "semantics" in values:
                    rep["values"] = np.asarray(values["semantics"], np.float32).tolist()
            elif name == "palette":
                rep = _palette_representation(np.asarray(values["palette"], np.float32))
            else:
                m = np.asarray(values[name], np.uint8)
                rep["map"] = m
                rep["picture"] = colourize_instances(m) if name == "instances" else m
            out[name] = rep
        return out

    # -- generate / edit ------------------------------------------------------------------------------
    async def generate(self, job: Job) -> Sampled | Refused:
        b = self.config.batching
        if b.enabled and job.num_images <= b.max_batch_size:
            return await self._batched(job)
        return (await self._submit([job]))[0]

    async def upscale(self, job: Job) -> Sampled | Refused:
        try:
            return await self._exclusive(self._upscale, job)
        except Exception as e:  # noqa: BLE001 - this request's failure is its own answer
            return _failed(e, "upscale")

    def _upscale(self, job: Job) -> Sampled:
        """/v1/upscale: ``job.source`` (at the base's side) through the upsamplers that make
        ``job.factor`` (all of them when None), guided by ``job.text`` when given."""

        from pipelines.diffusion.cascade import StageInputs, upsample, upscale_factors
        from pipelines.diffusion.inputs import upsample_bicubic

        t0 = time.perf_counter()
        pipes = self.cascade.stages[1:]
        if job.factor is not None:
            pipes = pipes[: upscale_factors(pipes).index(job.factor) + 1]
        stages = [
            StageInputs(
                self.decs[i + 1].caption(job.text) if job.text is not None else {},
                job.guidance,
                job.steps,
                level=job.level,
            )
            for i in range(len(pipes))
        ]
        images = np.repeat(np.asarray(job.source, np.uint8)[None], job.num_images, axis=0)
        ups = upsample(pipes, stages, images, job.seed)
        self.stats["jobs"] += 1
        return Sampled(
            images=ups[-1].images,
            guidance=ups[-1].guidance,
            invert_guidance=None,
            threshold=ups[-1].threshold,
            pictures={},
            batch={"requests": 1, "samples": job.num_images, "groups": 1},
            timings_s={"sample": round(time.perf_counter() - t0, 4)},
            stages=[{"resolution": u.resolution, "sample_s": round(u.seconds, 4)} for u in ups],
            bicubic=upsample_bicubic(job.source[None], ups[-1].resolution)[0],
        )

    @serve.batch(
        max_batch_size=8,
        batch_wait_timeout_s=0.01,
        max_concurrent_batches=8,
        batch_size_fn=lambda jobs: sum(j.num_images for j in jobs),
    )
    async def _batched(self, jobs: list[Job]) -> list[Sampled | Refused]:
        """``@serve.batch`` forms batches on a timer, also while the model is busy, so requests
        arriving during a sampling run get split into small batches. Each batch joins one
        queue, and the worker takes everything waiting when the model frees up (up to
        ``max_batch_size`` samples, oldest first): split batches merge."""
        return await self._submit(jobs)

    async def _submit(self, jobs: list[Job]) -> list[Sampled | Refused]:
        """Queue ``jobs`` for the worker and wait for their answers. If this call is cancelled
        (its client went away), its jobs are cancelled too: the worker skips those not started,
        and a run already under way finishes for the others in it."""
        loop = asyncio.get_running_loop()
        mine = [(job, loop.create_future()) for job in jobs]
        self.pending.extend(mine)
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._work())
        assert self._wake is not None
        self._wake.set()
        try:
            return list(await asyncio.gather(*(asyncio.shield(f) for _, f in mine)))
        except asyncio.CancelledError:
            for _, f in mine:
                f.cancel()
            raise

    def _take(self) -> list[tuple[Job, asyncio.Future]]:
        """The oldest waiting jobs that fit one run (one job when batching is off), skipping jobs
        whose callers have gone."""
        b = self.config.batching
        take: list[tuple[Job, asyncio.Future]] = []
        samples = 0
        while self.pending:
            job, f = self.pending[0]
            if f.done():  # cancelled before its turn
                self.pending.popleft()
                continue
            if take and (not b.enabled or samples + job.num_images > b.max_batch_size):
                break
            take.append(self.pending.popleft())
            samples += job.num_images
        return take

    async def _work(self) -> None:
        """The replica's one consumer of ``pending``: runs the model on what is waiting, answers
        every job it took, and sleeps (never spins) when nothing is."""
        assert self._wake is not None
        while True:
            take = self._take()
            if not take:
                self._wake.clear()
                await self._wake.wait()
                continue
            results: list[Sampled | Refused] | None = None
            try:
                results = await self._exclusive(self._run, [j for j, _ in take])
            except Exception as e:  # noqa: BLE001 - _run answers per job; this is a bug, not a job's fault
                results = [_failed(e, "a sampling run")] * len(take)
            finally:
                if results is None:  # the worker itself is being cancelled (replica shutdown)
                    results = [Refused(503, "unavailable", "the model replica is shutting down")] * len(take)
                for (_, f), r in zip(take, results, strict=True):
                    if not f.done():
                        f.set_result(r)

    def _stage_inputs(self, job: Job, i: int) -> "StageInputs":
        """The job's conditions at stage ``i``'s side, extracted as that stage was trained (its
        decomposer); what the request gave at the output side is resized (``resize_for_stage``)."""
        from pipelines.diffusion.cascade import StageInputs, resize_for_stage

        dec, side = self.decs[i], self.cascade.stages[i].image_size
        conditions: dict[str, Any] = {}
        if job.text is not None:
            conditions.update(dec.caption(job.text))
        if job.palette is not None:
            conditions["palette"] = job.palette
        for name, image in job.from_image.items():
            conditions.update(dec.decompose(resize_for_stage("image", image, side), [name]))
        conditions.update({name: resize_for_stage(name, m, side) for name, m in job.maps.items()})
        if job.prior:  # sampled once per job, the same for every stage
            if job.semantics is None:
                job.semantics = self.cascade.sample_semantics(
                    self.decs[0], job.text, job.prior_guidance, job.prior_steps, job.seed
                )
            conditions["semantics"] = job.semantics
        source = None if job.source is None else resize_for_stage("image", job.source, side)
        mask = None if job.mask is None else resize_for_stage("mask", job.mask, side)
        invert = None
        if job.kind == "edit":  # Composer §3.2: c1 = the same names, valued as the source decomposes
            invert = dec.decompose(source, sorted(job.given() - {"mask"}), job.source_text)
        guidance, steps = (
            (job.guidance, job.steps) if i == 0 else (job.upsampler_guidance, job.upsampler_steps)
        )
        paint = (
            None
            if job.paint is None
            else {k: resize_for_stage("mask", m, side) for k, m in job.paint.items()}
        )
        return StageInputs(
            conditions,
            guidance,
            steps,
            source,
            mask,
            invert,
            job.invert_guidance,
            paint=paint,
            paint_weight=job.paint_weight,
            paint_caption=job.text,
        )

    def _inputs(self, job: Job) -> "PreparedRequest":
        """The job's base-stage conditions extracted and checked (``ComposerPipeline.prepare``)."""
        from pipelines.diffusion.requests import SampleRequest

        if self._fault_text is not None and job.text == self._fault_text:
            raise RuntimeError("injected extraction fault (test seam)")
        stage = self._stage_inputs(job, 0)
        request = SampleRequest(
            conditions=stage.conditions,
            guidance=job.guidance,
            num_images=job.num_images,
            seed=job.seed,
            source=stage.source,
            mask=stage.mask,
            invert_conditions=stage.invert_conditions,
            invert_guidance=job.invert_guidance,
            paint=stage.paint,
            paint_weight=job.paint_weight,
            paint_caption=job.text,
        )
        return self.base.prepare(request)

    def _upsample(self, job: Job, out: "ComposerOutput", seconds: float) -> tuple[dict, list[dict]]:
        """A cascade: the base's samples of ``job`` through every upsampler (``out.images`` is
        replaced by the last stage's); returns the last stage's conditions and the stages' record."""
        from pipelines.diffusion.cascade import upsample

        stages = [self._stage_inputs(job, i) for i in range(1, len(self.cascade.stages))]
        ups = upsample(self.cascade.stages[1:], stages, out.images, job.seed)
        out.images = ups[-1].images
        record = [{"resolution": self.base.image_size, "steps": job.steps, "sample_s": round(seconds, 4)}]
        record += [
            {
                "resolution": u.resolution,
                "steps": job.upsampler_steps,
                "guidance": u.guidance,
                "sample_s": round(u.seconds, 4),
            }
            for u in ups
        ]
        return stages[-1].conditions, record

    def _sample(self, prepared: list["PreparedRequest"], key: tuple) -> list["ComposerOutput"]:
        """One batched sampling run; a failure that lost the device marks the replica unhealthy."""
        _, steps, scheduler, threshold = key
        try:
            return self.base.sample_batch(prepared, steps, scheduler, threshold)
        except Exception as e:
            if _device_lost(e):
                self.lost = f"{type(e).__name__} while sampling"
            raise

    def _run(self, jobs: list[Job]) -> list[Sampled | Refused]:
        """Extract each job's conditions, then one batched sampling run per compatible group. A
        group whose run fails is run again one job at a time, so that only the job that fails
        gets the failure."""
        t0 = time.perf_counter()
        results: list[Sampled | Refused | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = {}
        for i, job in enumerate(jobs):
            try:
                prepared[i] = self._inputs(job)
            except Exception as e:  # noqa: BLE001 - the ingress checks what it can; this job's failure is its own
                results[i] = _failed(e, "extracting a request's conditions")
                continue
            groups[(prepared[i].compatible_key(), job.steps, job.scheduler, job.threshold)].append(i)
        t_inputs = time.perf_counter() - t0
        self.stats["jobs"] += len(jobs)
        for key, members in groups.items():
            runs = [members]
            while runs:
                run = runs.pop(0)
                t = time.perf_counter()
                try:
                    outs = self._sample([prepared[i] for i in run], key)
                except Exception as e:  # noqa: BLE001 - see the docstring
                    if len(run) > 1 and self.lost is None:
                        runs += [[i] for i in run]
                    else:
                        for i in run:
                            results[i] = _failed(e, "sampling a request")
                    continue
                samples = sum(jobs[i].num_images for i in run)
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], samples)
                batch = {"requests": len(run), "samples": samples, "groups": len(groups)}
                timings = {"inputs": round(t_inputs, 4), "sample": round(time.perf_counter() - t, 4)}
                for i, out in zip(run, outs, strict=True):
                    try:
                        conditions, stages = prepared[i].conditions, None
                        if len(self.cascade.stages) > 1:  # each job through the upsamplers
                            conditions, stages = self._upsample(jobs[i], out, timings["sample"])
                        results[i] = _sampled(jobs[i], conditions, out, batch, timings, stages)
                    except Exception as e:  # noqa: BLE001 - its upsampling or pictures failed: its own failure
                        results[i] = _failed(e, "upsampling or drawing a request's pictures")
        return results  # type: ignore[return-value] - every job is refused or sampled

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the pipeline is gone, its device failed
        while sampling, or a tiny computation on the device no longer works."""
        import torch

        if self.pipe is None or getattr(self.pipe, "unet", None) is None:
            raise RuntimeError("the pipeline is not loaded")
        if self.lost is not None:
            raise RuntimeError(f"the replica can no longer sample: {self.lost}")
        probe = torch.ones(2, device=next(self.pipe.unet.parameters()).device)
        if float(probe.sum().item()) != 2.0:  # .item() synchronises: a lost GPU raises here
            raise RuntimeError("the model's device computes wrong results")
