"""Decoding and checking Serve API requests: a body -> a ``Job`` of arrays, or an ``ApiError``.

``Decoder.generate`` / ``Decoder.edit`` / ``Decoder.decompose`` check what a schema cannot —
limits from the config, images that decode, guidance that names given conditions, conditions the
model can decompose — and decode every image exactly as the model's training shards were decoded.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from pipelines.conditions import MAPS
from pipelines.serve.api import (
    ApiError,
    Conditions,
    DecomposeBody,
    EditBody,
    GenerateBody,
    Guidance,
    Job,
    MapSource,
    ModelInfo,
    Outpaint,
    PaletteSource,
    Sampling,
    Schedule,
    UpscaleBody,
)
from pipelines.serve.config import Limits


def b64_bytes(value: str, where: str, limits: Limits) -> bytes:
    """base64 (or a data URL) -> bytes; 422 if it is not base64, 413 if it is too big."""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(422, "invalid_image", "a data URL must be base64 (data:…;base64,…)", where)
    if len(value) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(
            413,
            "image_too_large",
            f"the image is over limits.max_image_bytes={limits.max_image_bytes}",
            where,
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", "not valid base64", where) from None
    if not data:
        raise ApiError(422, "invalid_image", "empty image", where)
    return data


def check_pixels(data: bytes, where: str, limits: Limits) -> tuple[int, int]:
    """The image's (width, height) from its header, before decoding it: 422 when it is not in
    ``limits.image_formats``, 413 when it is over ``max_image_pixels``."""
    import warnings

    from PIL import Image

    from pipelines.data.decode import UnsupportedImageFormat, open_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = open_image(data, limits.image_formats).size
    except UnsupportedImageFormat as e:
        raise ApiError(422, "unsupported_image_format", str(e), where) from None
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", "decompression bomb refused", where) from None
    except Exception as e:  # noqa: BLE001 - any failure to read the header: not an image
        raise ApiError(
            422, "undecodable_image", f"cannot decode the image ({type(e).__name__})", where
        ) from e
    if w * h > limits.max_image_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{w}x{h} = {w * h} pixels is over limits.max_image_pixels={limits.max_image_pixels}",
            where,
        )
    return w, h


def png_b64(a: np.ndarray) -> str:
    """(H, W) or (H, W, 3) uint8 -> base64 PNG."""
    from pipelines.files import encode_png

    return base64.b64encode(encode_png(np.ascontiguousarray(a))).decode()


def guidance_text(value: Guidance, where: str) -> str:
    """Any of the three guidance forms -> the text form of ``pipelines/diffusion/guidance.py``."""
    if isinstance(value, dict):
        if not value:
            raise ApiError(422, "invalid_guidance", "per-condition guidance needs at least one weight", where)
        parts = []
        for k, w in value.items():
            schedule = w if isinstance(w, Schedule) else None
            if schedule is not None:
                w = schedule.weight
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ApiError(422, "invalid_guidance", f"the weight of {k!r} must be a finite number", where)
            item = f"{k}={float(w)!r}"
            if schedule is not None:
                a, b = schedule.window
                if not (math.isfinite(a) and math.isfinite(b)):
                    raise ApiError(422, "invalid_guidance", f"the window of {k!r} must be finite", where)
                item += f"@{float(a)!r}:{float(b)!r},{schedule.shape}"
            parts.append(item)
        text = ",".join(parts)
    elif isinstance(value, bool):
        raise ApiError(422, "invalid_guidance", "guidance must be a number, text or mapping", where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ApiError(422, "invalid_guidance", f"guidance must be a finite number, got {value}", where)
    else:
        text = str(value)
    return text


class Decoder:
    """Decodes a request's images the way the model's training shards were decoded.

    ``dec``: the model's ``ImageDecomposer`` (its decode settings and resolution; the ingress
    never runs an extractor); ``info``: the model deployment's ``info()``.
    """

    def __init__(self, dec: Any, info: ModelInfo, limits: Limits, defaults: dict[str, Any]):
        self.dec, self.info, self.limits, self.defaults = dec, info, limits, defaults
        # the model's decode settings, reading only the formats this server allows
        self.decode = dec.config.decode.model_copy(update={"formats": tuple(limits.image_formats)})

    # -- pieces -----------------------------------------------------------------------------------
    def image(self, value: str, where: str) -> np.ndarray:
        return self.sized_image(value, where)[0]

    def sized_image(self, value: str, where: str) -> tuple[np.ndarray, tuple[int, int]]:
        """The decoded (R, R, 3) image and the (width, height) it was uploaded at."""
        data = b64_bytes(value, where, self.limits)
        size = check_pixels(data, where, self.limits)
        from pipelines.data.decode import decode_image

        try:
            return decode_image(data, self.dec.resolution, self.decode), size
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad upload
            raise ApiError(
                422, "undecodable_image", f"cannot decode the image ({type(e).__name__}: {e})", where
            ) from e

    def map(self, name: str, value: str, where: str) -> np.ndarray:
        data = b64_bytes(value, where, self.limits)
        check_pixels(data, where, self.limits)
        try:
            return self.dec.load_map(name, data)
        except Exception as e:  # noqa: BLE001
            raise ApiError(422, "undecodable_image", f"cannot decode the {name} map ({e})", where) from e

    def mask(self, value: str, where: str, source: str, source_size: tuple[int, int]) -> np.ndarray:
        """A mask framed like the image it edits (``source``, uploaded at ``source_size``): 422
        when their aspect ratios differ (by more than a pixel's rounding) rather than stretching it."""
        data = b64_bytes(value, where, self.limits)
        w, h = check_pixels(data, where, self.limits)
        sw, sh = source_size
        if abs(w * sh - h * sw) > max(w, h, sw, sh):
            raise ApiError(
                422,
                "mask_aspect_mismatch",
                f"the mask is {w}x{h} but the image it edits ({source}) is {sw}x{sh}: draw it over "
                "the whole image, at any size of the same aspect ratio",
                where,
            )
        try:
            mask = self.dec.load_mask(data)
        except Exception as e:  # noqa: BLE001
            raise ApiError(422, "undecodable_image", f"cannot decode the mask ({e})", where) from e
        if not mask.any():
            raise ApiError(422, "empty_mask", "the mask marks nothing to regenerate (no white pixel)", where)
        return mask

    def decomposable(self, name: str, where: str) -> None:
        ok = self.info.decomposable.get(name, f"{name} cannot be decomposed")
        if ok is not True:
            raise ApiError(422, "unavailable_condition", f"{name}: {ok}", where)

    # -- requests ---------------------------------------------------------------------------------
    def _sampling(self, body: Sampling, job: Job) -> None:
        lim = self.limits
        job.steps = self.defaults["steps"] if body.steps is None else body.steps
        if not 1 <= job.steps <= lim.max_steps:
            raise ApiError(
                422, "out_of_range", f"steps must be in 1..{lim.max_steps}, got {job.steps}", "steps"
            )
        if not 1 <= body.num_images <= lim.max_num_images:
            raise ApiError(
                422,
                "out_of_range",
                f"num_images must be in 1..{lim.max_num_images}, got {body.num_images}",
                "num_images",
            )
        if not 0 <= body.seed < 2**63:
            raise ApiError(422, "out_of_range", f"seed must be in 0..2^63-1, got {body.seed}", "seed")
        job.num_images, job.seed = body.num_images, body.seed
        job.scheduler, job.threshold = body.scheduler, body.threshold
        g = self.defaults["guidance"] if body.guidance is None else body.guidance
        job.guidance = guidance_text(g, "guidance")
        n = self.defaults.get("upsampler_steps", 20) if body.upsampler_steps is None else body.upsampler_steps
        if not 1 <= n <= lim.max_steps:
            raise ApiError(
                422,
                "out_of_range",
                f"upsampler_steps must be in 1..{lim.max_steps}, got {n}",
                "upsampler_steps",
            )
        job.upsampler_steps = n
        ug = body.upsampler_guidance
        job.upsampler_guidance = job.guidance if ug is None else guidance_text(ug, "upsampler_guidance")

    def _images(self, images: dict[str, str]) -> dict[str, str]:
        if len(images) > self.limits.max_images:
            raise ApiError(
                422, "out_of_range", f"at most limits.max_images={self.limits.max_images} images", "images"
            )
        return images

    def _conditions(self, cond: Conditions, images: dict[str, str], job: Job, where: str) -> None:
        decoded: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}

        def sized_ref(name: str, at: str) -> tuple[np.ndarray, tuple[int, int]]:
            if name not in images:
                known = ", ".join(sorted(images)) or "none"
                raise ApiError(
                    422, "unknown_image", f"no image named {name!r} in images (given: {known})", at
                )
            if name not in decoded:
                decoded[name] = self.sized_image(images[name], f"images.{name}")
            return decoded[name]

        def ref(name: str, at: str) -> np.ndarray:
            return sized_ref(name, at)[0]

        lim = self.limits
        if cond.text is not None:
            if len(cond.text) > lim.max_text_chars:
                raise ApiError(
                    422,
                    "out_of_range",
                    f"text is over limits.max_text_chars={lim.max_text_chars}",
                    f"{where}.text",
                )
            self.decomposable("caption", f"{where}.text")
            job.text = cond.text
        if cond.semantics is not None:
            self.decomposable("semantics", f"{where}.semantics")
            job.from_image["semantics"] = ref(cond.semantics.image, f"{where}.semantics.image")
            job.references["semantics"] = cond.semantics.image
        if cond.palette is not None:
            job_palette(self, cond.palette, job, ref, f"{where}.palette")
        for name in MAPS:
            if getattr(cond, name) is not None:
                self._map_condition(name, getattr(cond, name), job, ref, f"{where}.{name}")
        if cond.mask is not None:
            job.source, size = sized_ref(cond.mask.source, f"{where}.mask.source")
            job.mask = self.mask(cond.mask.mask, f"{where}.mask.mask", f"images.{cond.mask.source}", size)
            job.references["mask"] = cond.mask.source

    def _map_condition(self, name: str, src: MapSource, job: Job, ref: Any, at: str) -> None:
        """A local condition from a reference image (decomposed by the model) or a ready map."""
        if (src.image is None) == (src.map is None):
            raise ApiError(422, "invalid_request", f"give {name}.image or {name}.map, exactly one", at)
        if src.image is not None:
            self.decomposable(name, at)
            job.from_image[name] = ref(src.image, f"{at}.image")
            job.references[name] = src.image
        else:
            job.maps[name] = self.map(name, src.map, f"{at}.map")

    def _check_guidance(self, text: str, given: frozenset[str], where: str) -> None:
        from pipelines.diffusion.guidance import Guidance

        try:
            g = Guidance.parse(text, given)
        except ValueError as e:
            raise ApiError(422, "invalid_guidance", str(e), where) from None
        worst = max((abs(w) for _, w in g.terms), default=0.0)
        if worst > self.limits.max_guidance:
            raise ApiError(
                422, "out_of_range", f"guidance weights must be within ±{self.limits.max_guidance}", where
            )

    def generate(self, body: GenerateBody) -> Job:
        job = Job(kind="generate")
        self._sampling(body, job)
        images = self._images(body.images)
        self._conditions(body.conditions, images, job, "conditions")
        if body.outpaint is not None:
            self._outpaint(body.outpaint, images, job, body.conditions.mask is not None)
        if body.prior:
            self._prior(body, job)
        if body.paint:
            self._paint(body, job)
        self._check_guidance(job.guidance, job.given(), "guidance")
        self._check_guidance(job.upsampler_guidance, job.given(), "upsampler_guidance")
        return job

    def _paint(self, body: GenerateBody, job: Job) -> None:
        """Paint-with-words: each phrase's region decoded as a mask of a square output (white =
        painted); whether the phrase is in the caption is the model's tokenizer's to say."""
        if job.text is None:
            raise ApiError(
                422, "invalid_request", "paint paints phrases of conditions.text: give text", "paint"
            )
        job.paint = {}
        for phrase, value in (body.paint or {}).items():
            where = f"paint.{phrase}"
            if not phrase.strip():
                raise ApiError(422, "invalid_request", "a paint phrase is empty", "paint")
            data = b64_bytes(value, where, self.limits)
            check_pixels(data, where, self.limits)
            try:
                region = self.dec.load_mask(data)
            except Exception as e:  # noqa: BLE001
                raise ApiError(
                    422, "undecodable_image", f"cannot decode the paint region ({e})", where
                ) from e
            if not region.any():
                raise ApiError(
                    422, "empty_mask", f"the region of {phrase!r} paints nothing (no white pixel)", where
                )
            job.paint[phrase] = region
        job.paint_weight = body.paint_weight

    def _prior(self, body: GenerateBody, job: Job) -> None:
        if not self.info.prior:
            raise ApiError(
                422, "no_prior", "the served model has no prior (recompose cascade --prior)", "prior"
            )
        if job.text is None or "semantics" in job.from_image:
            raise ApiError(
                422,
                "invalid_request",
                "prior samples the semantics from conditions.text: give text, no semantics",
                "prior",
            )
        steps = 50 if body.prior_steps is None else body.prior_steps
        if not 1 <= steps <= self.limits.max_steps:
            raise ApiError(
                422, "out_of_range", f"prior_steps must be in 1..{self.limits.max_steps}", "prior_steps"
            )
        job.prior, job.prior_guidance, job.prior_steps = True, body.prior_guidance, steps

    def _outpaint(self, o: Outpaint, images: dict[str, str], job: Job, masked: bool) -> None:
        """The image on the output canvas, the border to generate as the mask (exact elsewhere)."""
        from pipelines.data.decode import decode_rgb
        from pipelines.diffusion.outpaint import SIDES, outpaint_canvas

        if masked:
            raise ApiError(
                422, "invalid_request", "outpaint makes its own mask: no conditions.mask with it", "outpaint"
            )
        if o.image not in images:
            known = ", ".join(sorted(images)) or "none"
            raise ApiError(
                422,
                "unknown_image",
                f"no image named {o.image!r} in images (given: {known})",
                "outpaint.image",
            )
        pad = {side: getattr(o, side) for side in SIDES}
        if not any(pad.values()):
            raise ApiError(422, "invalid_request", "outpaint extends no side; give e.g. left: 16", "outpaint")
        data = b64_bytes(images[o.image], f"images.{o.image}", self.limits)
        check_pixels(data, f"images.{o.image}", self.limits)
        try:
            image = np.asarray(decode_rgb(data, self.decode))
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad upload
            raise ApiError(
                422, "undecodable_image", f"cannot decode the image ({e})", f"images.{o.image}"
            ) from e
        try:
            job.source, job.mask = outpaint_canvas(image, pad, self.dec.resolution)
        except ValueError as e:
            raise ApiError(422, "out_of_range", str(e), "outpaint") from None
        job.references["mask"] = o.image
        job.outpaint = pad

    def upscale(self, body: UpscaleBody) -> Job:
        """Super-resolution by the cascade's upsamplers: the image at the first one's input side."""
        from pipelines.data.decode import decode_image

        factors = self.info.upscale_factors
        if not factors:
            raise ApiError(
                422,
                "no_upsampler",
                "the served model is not a cascade: it has no upsampler to upscale with",
                None,
            )
        if body.factor is not None and body.factor not in factors:
            raise ApiError(
                422,
                "out_of_range",
                f"factor must be one of {factors} for this cascade, got {body.factor}",
                "factor",
            )
        job = Job(kind="upscale", factor=body.factor, level=body.level)
        sampling = Sampling(
            guidance=body.guidance, steps=body.steps, seed=body.seed, num_images=body.num_images
        )
        self._sampling(sampling, job)
        if body.steps is None:
            job.steps = job.upsampler_steps
        if body.text is not None:
            if len(body.text) > self.limits.max_text_chars:
                raise ApiError(
                    422,
                    "out_of_range",
                    f"text is over limits.max_text_chars={self.limits.max_text_chars}",
                    "text",
                )
            job.text = body.text
        self._check_guidance(job.guidance, job.given(), "guidance")
        data = b64_bytes(body.image, "image", self.limits)
        check_pixels(data, "image", self.limits)
        try:
            job.source = decode_image(data, self.info.stages[0], self.decode)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad upload
            raise ApiError(
                422, "undecodable_image", f"cannot decode the image ({type(e).__name__}: {e})", "image"
            ) from e
        return job

    def edit(self, body: EditBody) -> Job:
        """Bidirectional guidance (Composer §3.2): invert ``source`` under the changed conditions'
        names valued as the source decomposes, then sample under the new values."""
        job = Job(kind="edit")
        self._sampling(body, job)
        if body.scheduler != "ddim":
            raise ApiError(
                422, "invalid_request", "edit inverts with DDIM; use scheduler 'ddim'", "scheduler"
            )
        if body.conditions.mask is not None:
            raise ApiError(
                422, "invalid_request", "give the edit's mask as `mask`, not a condition", "conditions.mask"
            )
        self._conditions(body.conditions, self._images(body.images), job, "conditions")
        changed = job.given()
        if not changed:
            raise ApiError(
                422, "invalid_request", "an edit needs at least one condition to change", "conditions"
            )
        job.source, source_size = self.sized_image(body.source, "source")
        for name in changed:  # the source is decomposed under the same names
            self.decomposable(name, f"conditions.{'text' if name == 'caption' else name}")
        if body.source_text is not None and len(body.source_text) > self.limits.max_text_chars:
            raise ApiError(422, "out_of_range", "source_text is over limits.max_text_chars", "source_text")
        job.source_text = body.source_text
        if "caption" in changed and job.source_text is None:
            job.source_text = job.text
        if body.mask is not None:
            job.mask = self.mask(body.mask, "mask", "source", source_size)
        job.invert_guidance = guidance_text(body.invert_guidance, "invert_guidance")
        self._check_guidance(job.guidance, job.given(), "guidance")
        self._check_guidance(job.invert_guidance, changed, "invert_guidance")
        return job

    def decompose(self, body: DecomposeBody) -> tuple[np.ndarray, list[str], str | None]:
        names = body.conditions
        if names is None:
            names = [n for n, ok in self.info.decomposable.items() if ok is True]
            if body.text is None:
                names = [n for n in names if n != "caption"]
        for i, name in enumerate(names):
            if name not in self.info.decomposable:
                known = ", ".join(self.info.decomposable)
                raise ApiError(
                    422,
                    "unknown_condition",
                    f"unknown representation {name!r}; known: {known}",
                    f"conditions[{i}]",
                )
            self.decomposable(name, f"conditions[{i}]")
        if "caption" in names and body.text is None:
            raise ApiError(422, "invalid_request", "the caption representation needs `text`", "text")
        if body.text is not None and len(body.text) > self.limits.max_text_chars:
            raise ApiError(422, "out_of_range", "text is over limits.max_text_chars", "text")
        return self.image(body.image, "image"), list(dict.fromkeys(names)), body.text


def job_palette(d: Decoder, src: PaletteSource, job: Job, ref: Any, at: str) -> None:
    """A palette from hex colours (with the model's smoothing) or from a reference image."""
    from pipelines.conditions.palette import palette_from_hex

    if (src.image is None) == (src.colors is None):
        raise ApiError(422, "invalid_request", "give palette.colors or palette.image, exactly one", at)
    if src.image is not None:
        if src.weights is not None:
            raise ApiError(422, "invalid_request", "palette.weights go with palette.colors", f"{at}.weights")
        d.decomposable("palette", at)
        job.from_image["palette"] = ref(src.image, f"{at}.image")
        job.references["palette"] = src.image
        return
    if not src.colors or len(src.colors) > 156:
        raise ApiError(422, "out_of_range", "palette.colors needs 1..156 colours", f"{at}.colors")
    weights = src.weights
    if weights is not None and (
        len(weights) != len(src.colors)
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or not 0 < sum(weights) < math.inf
    ):
        raise ApiError(
            422,
            "invalid_palette",
            "palette.weights: one finite number >= 0 per colour, with a positive sum",
            f"{at}.weights",
        )
    try:
        job.palette = palette_from_hex(list(src.colors), weights, sigma=d.dec.config.palette.sigma)
    except ValueError as e:
        raise ApiError(422, "invalid_palette", str(e), f"{at}.colors") from None
