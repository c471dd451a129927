"""The Serve API's request and response formats (no Ray in here).

Request bodies are pydantic models (``extra="forbid"``), so FastAPI documents them in OpenAPI and
an unknown field is named in the error. ``pipelines/serve/decoding.py`` then checks what a schema
cannot and turns a body into a ``Job`` of decoded arrays for the model deployment, which answers
with ``Sampled`` or ``Refused``. Anything wrong raises ``ApiError`` (a 4xx with a code, a message
and the offending field) before the model is called.

Images travel as base64 strings of an encoded file (PNG, JPEG, WebP, …), optionally as
``data:image/…;base64,`` URLs; responses carry PNGs as plain base64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Schedule(BaseModel):
    """A condition's guidance weight acting in a window of the sampling steps (0 = first, 1 = end)."""

    model_config = ConfigDict(extra="forbid")
    weight: float
    window: tuple[float, float] = (0.0, 1.0)
    shape: Literal["constant", "linear", "decay", "cosine"] = "constant"


Guidance = float | str | dict[str, float | Schedule]


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx; 5xx for the server's own failures), a stable
    ``code``, a message, the field; ``error_id`` names the server log line with the details of
    a 5xx (responses never carry exception text)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, error_id: str | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.error_id = error_id

    def __reduce__(self) -> tuple:  # raised in a decode process, re-raised in the ingress
        return (ApiError, (self.status, self.code, self.message, self.field, self.error_id))

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if self.error_id is not None:
            err["id"] = self.error_id
        return {"error": err}


def new_error_id() -> str:
    """A short random id that ties a 5xx answer to its server log line."""
    import uuid

    return uuid.uuid4().hex[:12]


# -- request bodies ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FromImage(_Strict):
    """A condition decomposed from one of the request's ``images``."""

    image: str = Field(description="name of a reference image in `images`")


class MapSource(_Strict):
    """A local condition: decomposed from a reference image, or a ready map used as it is."""

    image: str | None = Field(None, description="name of a reference image in `images`")
    map: str | None = Field(
        None,
        description="base64 PNG of a ready map (grayscale for sketch/depth/intensity; ids or a "
        "colourised picture for instances), e.g. an edited `map_png` from /v1/decompose",
    )


class PaletteSource(_Strict):
    """Hex colours (optionally weighted), or the palette of a reference image."""

    colors: list[str] | None = Field(None, description="hex colours, e.g. ['#ff0000', '#00f']")
    weights: list[float] | None = Field(None, description="proportions of `colors` (default equal)")
    image: str | None = Field(None, description="name of a reference image in `images`")


class MaskSource(_Strict):
    """Region-restricted editing: white in ``mask`` = regenerate; elsewhere ``source`` is kept."""

    mask: str = Field(description="base64 PNG, white = regenerate (framed like the source)")
    source: str = Field(description="name of the reference image the mask applies to")


class Conditions(_Strict):
    """Any subset of Composer's representations; an unknown name is refused."""

    text: str | None = Field(None, description="the caption")
    semantics: FromImage | None = None
    palette: PaletteSource | None = None
    sketch: MapSource | None = None
    instances: MapSource | None = None
    depth: MapSource | None = None
    intensity: MapSource | None = None
    mask: MaskSource | None = None


GUIDANCE_DOC = (
    "classifier-free guidance over condition sets (Composer Eq. 2): a number (all given "
    "conditions, e.g. 3), the text form 'text=5,sketch=2@0:0.6', or per-condition weights "
    "{'text': 5, 'sketch': {'weight': 2, 'window': [0, 0.6], 'shape': 'constant'}}: a schedule acts "
    "in its window of the steps (0 = first, 1 = end), with shape constant, linear, decay or cosine"
)


class Sampling(_Strict):
    guidance: Guidance | None = Field(None, description=GUIDANCE_DOC + "; default the server's")
    steps: int | None = Field(None, description="denoising steps (a cascade's base); default the server's")
    upsampler_steps: int | None = Field(
        None, description="a cascade's upsamplers: denoising steps of each; default the server's"
    )
    upsampler_guidance: Guidance | None = Field(
        None, description="a cascade's upsamplers: their guidance; default `guidance`"
    )
    seed: int = Field(0, description="same seed, same images")
    num_images: int = Field(1, description="samples to return")
    scheduler: Literal["ddim", "dpm++"] = "ddim"
    threshold: Literal["clip", "dynamic", "none"] | None = None


class Outpaint(_Strict):
    """Outpainting (DALL-E 2): the image on a larger canvas, the new border generated; sides in
    output pixels. The image fills the rest of the canvas, its pixels kept exactly."""

    image: str = Field(description="name of the reference image in `images` to extend")
    left: int = Field(0, ge=0)
    right: int = Field(0, ge=0)
    top: int = Field(0, ge=0)
    bottom: int = Field(0, ge=0)


class GenerateBody(Sampling):
    images: dict[str, str] = Field(default_factory=dict, description="reference images: name -> base64")
    conditions: Conditions = Field(default_factory=Conditions)
    outpaint: Outpaint | None = Field(
        None, description="extend an image's canvas (no conditions.mask with it)"
    )
    paint: dict[str, str] | None = Field(
        None,
        description="paint-with-words (eDiffi): a phrase of conditions.text -> a base64 mask picture "
        "(white = where the phrase goes), framed as a square output",
    )
    paint_weight: float = Field(
        1.0, ge=0, le=20, description="how strongly painted phrases attend to their regions"
    )
    prior: bool = Field(
        False,
        description="sample the semantics from conditions.text with the cascade's prior (GET /v1/model: prior)",
    )
    prior_guidance: float = Field(4.0, ge=0, le=50, description="the prior's guidance scale")
    prior_steps: int | None = Field(None, description="the prior's denoising steps; default 50")


class UpscaleBody(_Strict):
    """Super-resolution of an image alone (SR3) by the served cascade's upsamplers."""

    image: str = Field(description="base64 of the image (brought to the first upsampler's input side)")
    text: str | None = Field(None, description="a caption to guide the upsamplers")
    factor: int | None = Field(
        None, description="how much larger (a product of the upsamplers' factors); default all"
    )
    steps: int | None = Field(None, description="denoising steps of each upsampler; default the server's")
    guidance: Guidance | None = Field(None, description="guidance with `text`; default the server's")
    level: int = Field(0, ge=0, le=999, description="noise-augmentation level of each upsampler's input")
    seed: int = Field(0, description="same seed, same images")
    num_images: int = Field(1, description="samples to return")


class EditBody(Sampling):
    source: str = Field(description="base64 of the image to edit")
    images: dict[str, str] = Field(default_factory=dict, description="reference images: name -> base64")
    conditions: Conditions = Field(description="the conditions to change (no mask: give `mask`)")
    mask: str | None = Field(None, description="base64 PNG, white = the only region that may change")
    source_text: str | None = Field(None, description="the source's caption (default conditions.text)")
    invert_guidance: Guidance = Field(1.0, description="guidance of the DDIM inversion; 1 = plain")


class DecomposeBody(_Strict):
    image: str = Field(description="base64 of the image")
    conditions: list[str] | None = Field(None, description="representations to return; default all")
    text: str | None = Field(None, description="its caption (for the caption representation)")


# -- what the ingress hands the model ------------------------------------------------------------
@dataclass
class Job:
    """A checked request with decoded arrays; the model deployment only extracts and samples."""

    kind: Literal["generate", "edit", "upscale"]
    text: str | None = None
    palette: np.ndarray | None = None  # (156,) float, from hex colours
    from_image: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> (R, R, 3) uint8
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> (R, R) uint8
    references: dict[str, str] = field(default_factory=dict)  # condition -> image name (records)
    source: np.ndarray | None = None  # (R, R, 3) uint8
    mask: np.ndarray | None = None  # (R, R) uint8 {0, 1}
    source_text: str | None = None
    guidance: str = "3"
    invert_guidance: str = "1"
    steps: int = 50
    seed: int = 0
    num_images: int = 1
    scheduler: str = "ddim"
    threshold: str | None = None
    upsampler_steps: int = 20  # a cascade's upsamplers (upscale: ``steps`` is theirs)
    upsampler_guidance: str = "3"
    factor: int | None = None  # upscale: how much larger (None: every upsampler)
    level: int = 0  # upscale: the upsamplers' noise-augmentation level
    outpaint: dict[str, int] | None = None  # the sides an outpainting extends (records)
    prior: bool = False  # sample the semantics from the caption with the cascade's prior
    prior_guidance: float = 4.0
    prior_steps: int = 50
    semantics: np.ndarray | None = None  # (D,) what the prior sampled (set by the model deployment)
    paint: dict[str, np.ndarray] | None = None  # paint-with-words: phrase -> (R, R) {0, 1} region
    paint_weight: float = 1.0

    def given(self) -> frozenset[str]:
        names = set(self.from_image) | set(self.maps)
        if self.text is not None:
            names.add("caption")
        if self.palette is not None:
            names.add("palette")
        if self.mask is not None:
            names.add("mask")
        if self.prior:
            names.add("semantics")
        return frozenset(names)


@dataclass
class ModelInfo:
    """What the model deployment holds (``ComposerServer.info``); ``GET /v1/model`` shows it,
    less ``decompose_settings``, which the ingress decodes uploads with."""

    model: str  # its name (never a filesystem path: ``pipelines.diffusion.loading.model_label``)
    version: str
    resolution: int  # R: maps and samples are R×R (a cascade: its last stage's)
    conditions: list[str]
    inputs: dict[str, str]  # condition -> what the model takes for it
    decomposable: dict[str, bool | str]  # True, or why it cannot be taken from an image
    caption_encoder: str
    semantics_encoder: str
    decompose_settings: dict[str, Any]
    device: str
    stats: dict[str, int]  # jobs, batches, decompositions, largest_batch
    stages: list[int] = field(default_factory=list)  # a cascade: each stage's side, base first
    upscale_factors: list[int] = field(default_factory=list)  # what /v1/upscale can do (×2, ×4, …)
    prior: bool = False  # a cascade with a prior: generate can sample the semantics from the caption
    experts: list[dict[str, Any]] = field(default_factory=list)  # an ensemble base: names, noise ranges


@dataclass
class Sampled:
    """One job's samples from the model deployment."""

    images: np.ndarray  # (N, R, R, 3) uint8
    guidance: dict[str, Any]  # Guidance.describe()
    invert_guidance: dict[str, Any] | None  # edits: the inversion's
    threshold: str
    pictures: dict[str, np.ndarray]  # condition -> its picture (pipelines/diffusion/pictures.py)
    batch: dict[str, int]  # requests, samples, groups of the sampling run it was part of
    timings_s: dict[str, float]
    stages: list[dict[str, Any]] | None = None  # a cascade (or upscale): per stage side, steps, time
    bicubic: np.ndarray | None = None  # upscale: the input upsampled bicubically (the baseline)
    semantics: list[float] | None = None  # generate with the prior: the embedding it sampled


@dataclass
class Refused:
    """A job the model could not run (what the ingress could not check, or a failure of the
    server while running that job alone); answered as ``ApiError``."""

    status: int
    code: str
    message: str
    error_id: str | None = None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """pydantic's errors -> one ``ApiError``: the first problem, by field (an unknown key in
    ``conditions`` is an ``unknown_condition``)."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    where = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", f"the body is not valid JSON: {e.get('msg')}", None)
    if kind == "extra_forbidden":
        if len(loc) >= 2 and loc[-2] == "conditions":
            known = ", ".join(Conditions.model_fields)
            return ApiError(422, "unknown_condition", f"unknown condition {loc[-1]!r}; known: {known}", where)
        return ApiError(422, "unknown_field", f"unknown field {loc[-1]!r}", where)
    if kind == "missing":
        return ApiError(422, "missing_field", f"{where} is required", where)
    return ApiError(422, "invalid_request", f"{where}: {e.get('msg')}", where)
