"""The Serve app's model deployment: one ``ComposerPipeline`` per replica (Ray Serve).

``ComposerServer`` holds the pipeline and its ``ImageDecomposer`` (the training shards'
extractors and settings), decomposes uploaded images and samples. Generation requests go
through ``@serve.batch``: compatible requests (``PreparedRequest.compatible_key`` plus steps,
scheduler and threshold) share one ``ComposerPipeline.sample_batch`` run. The ingress
(``pipelines/serve/app.py``) has checked every request before it gets here.
"""

import asyncio
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from pipelines.config import from_dict
from pipelines.serve.api import Job, ModelInfo, Refused, Sampled
from pipelines.serve.config import ServeConfig

if TYPE_CHECKING:  # the ingress imports this module too; it never loads torch
    from pipelines.diffusion.pipeline import ComposerOutput
    from pipelines.diffusion.requests import PreparedRequest


# Defined before the deployment: Ray pickles its class with the globals it finds then.
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
    prepared: "PreparedRequest",
    out: "ComposerOutput",
    batch: dict[str, int],
    timings: dict[str, float],
) -> Sampled:
    """One job's share of a sampling run, with the pictures of the conditions it was given."""
    from pipelines.diffusion.pictures import condition_pictures

    refs = {"semantics": job.from_image["semantics"]} if "semantics" in job.from_image else {}
    return Sampled(
        images=out.images,
        guidance=out.guidance,
        invert_guidance=out.invert_guidance,
        threshold=out.threshold,
        pictures=condition_pictures(prepared.conditions, job.source, job.mask, refs),
        batch=batch,
        timings_s=timings,
    )


@serve.deployment(name="ComposerServer")
class ComposerServer:
    """Holds one ``ComposerPipeline`` and its ``ImageDecomposer``; sampling runs in a thread so
    the replica keeps answering (health checks, batching) while the model works."""

    def __init__(self, config: dict[str, Any]):
        from pipelines.data.decomposer import ImageDecomposer
        from pipelines.diffusion.loading import load_pipeline, resolve_device

        self.config = from_dict(ServeConfig, config)
        device = resolve_device(self.config.model_deployment.device)
        self.pipe = load_pipeline(self.config.model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.dec = ImageDecomposer.for_pipeline(self.pipe, device)
        self.decomposable = self._decomposable()
        self.stats = {"jobs": 0, "batches": 0, "decompositions": 0, "largest_batch": 0}
        self.lock = asyncio.Lock()  # one model call at a time per replica (batching or not)
        self.pending: list[tuple[Job, asyncio.Future]] = []  # batched jobs waiting for the model
        b = self.config.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    def _decomposable(self) -> dict[str, bool | str]:
        """Which representations can be taken from an image with this pipeline's settings."""
        from pipelines.conditions import EXTRACTED_NAMES, ExtractorUnavailable

        cfg = self.pipe.unet.config
        out: dict[str, bool | str] = {}
        for name in EXTRACTED_NAMES:
            if (name == "caption" and cfg.caption_encoder == "trainable") or (
                name == "semantics" and cfg.semantics_encoder == "trainable"
            ):
                out[name] = True  # the model encodes the text / the image itself
                continue
            try:
                self.dec.extractor(name)
                out[name] = True
            except ExtractorUnavailable as e:
                out[name] = str(e)
        return out

    def info(self) -> ModelInfo:
        cfg = self.pipe.unet.config
        r = self.pipe.image_size
        sizes = {
            "caption": "text" if cfg.caption_encoder == "trainable" else f"{cfg.caption_encoder} embeddings",
            "semantics": "image" if cfg.semantics_encoder == "trainable" else f"vector ({cfg.semantics_dim})",
            "palette": "156-bin histogram",
            **{m: f"{r}x{r} map" for m in ("sketch", "instances", "depth", "intensity")},
            "mask": f"{r}x{r} mask + source image",
        }
        return ModelInfo(
            model=self.config.model,
            resolution=r,
            conditions=list(sizes),
            inputs=sizes,
            decomposable=self.decomposable,
            caption_encoder=cfg.caption_encoder,
            semantics_encoder=cfg.semantics_encoder,
            decompose_settings=dict(self.pipe.config.decompose),
            device=self.device,
            stats=dict(self.stats),
        )

    # -- decompose ----------------------------------------------------------------------------------
    async def decompose(self, image: np.ndarray, names: list[str], text: str | None) -> dict[str, Any]:
        async with self.lock:
            return await asyncio.to_thread(self._decompose, image, names, text)

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
        async with self.lock:
            return (await asyncio.to_thread(self._run, [job]))[0]

    @serve.batch(
        max_batch_size=8,
        batch_wait_timeout_s=0.01,
        max_concurrent_batches=8,
        batch_size_fn=lambda jobs: sum(j.num_images for j in jobs),
    )
    async def _batched(self, jobs: list[Job]) -> list[Sampled | Refused]:
        """``@serve.batch`` forms batches on a timer, also while the model is busy, so requests
        arriving during a sampling run get split into small batches. Each batch joins one
        queue here, and whoever gets the model next takes everything waiting (up to
        ``max_batch_size`` samples, oldest first): split batches merge when the model frees up."""
        loop = asyncio.get_running_loop()
        mine = [(job, loop.create_future()) for job in jobs]
        self.pending.extend(mine)
        while not all(f.done() for _, f in mine):
            async with self.lock:
                take, samples = [], 0
                while self.pending and (
                    not take or samples + self.pending[0][0].num_images <= self.config.batching.max_batch_size
                ):
                    take.append(self.pending.pop(0))
                    samples += take[-1][0].num_images
                if not take:
                    continue
                try:
                    results = await asyncio.to_thread(self._run, [j for j, _ in take])
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for _, f in take:
                        f.set_exception(e)
                else:
                    for (_, f), r in zip(take, results, strict=True):
                        f.set_result(r)
        return [await f for _, f in mine]

    def _inputs(self, job: Job) -> "PreparedRequest":
        """The job's conditions extracted and checked (``ComposerPipeline.prepare``)."""
        from pipelines.diffusion.requests import SampleRequest

        dec, conditions = self.dec, {}
        if job.text is not None:
            conditions.update(dec.caption(job.text))
        if job.palette is not None:
            conditions["palette"] = job.palette
        for name, image in job.from_image.items():
            conditions.update(dec.decompose(image, [name]))
        conditions.update(job.maps)
        invert = None
        if job.kind == "edit":  # Composer §3.2: c1 = the same names, valued as the source decomposes
            names = sorted(job.given() - {"mask"})
            invert = dec.decompose(job.source, names, job.source_text)
        request = SampleRequest(
            conditions=conditions,
            guidance=job.guidance,
            num_images=job.num_images,
            seed=job.seed,
            source=job.source,
            mask=job.mask,
            invert_conditions=invert,
            invert_guidance=job.invert_guidance,
        )
        return self.pipe.prepare(request)

    def _run(self, jobs: list[Job]) -> list[Sampled | Refused]:
        """Extract each job's conditions, then one batched sampling run per compatible group."""
        t0 = time.perf_counter()
        results: list[Sampled | Refused | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        prepared = {}
        for i, job in enumerate(jobs):
            try:
                prepared[i] = self._inputs(job)
            except ValueError as e:  # the ingress checks everything it can; this is what is left
                results[i] = Refused(422, "invalid_request", str(e))
                continue
            groups[(prepared[i].compatible_key(), job.steps, job.scheduler, job.threshold)].append(i)
        t_inputs = time.perf_counter() - t0
        self.stats["jobs"] += len(jobs)
        for (_, steps, scheduler, threshold), members in groups.items():
            t = time.perf_counter()
            outs = self.pipe.sample_batch([prepared[i] for i in members], steps, scheduler, threshold)
            samples = sum(jobs[i].num_images for i in members)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], samples)
            batch = {"requests": len(members), "samples": samples, "groups": len(groups)}
            timings = {"inputs": round(t_inputs, 4), "sample": round(time.perf_counter() - t, 4)}
            for i, out in zip(members, outs, strict=True):
                results[i] = _sampled(jobs[i], prepared[i], out, batch, timings)
        return results  # type: ignore[return-value] - every job is refused or sampled

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("the pipeline is not loaded")
