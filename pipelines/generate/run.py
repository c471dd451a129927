"""``recompose generate``: conditions from command-line flags -> samples, pictures and a record.

    GenerateConfig (checked before anything is loaded; pipelines/generate/config.py)
          -> the pipeline, or a cascade's stages (load_cascade) -> conditions per stage
             (ImageDecomposer: the training shards' extractors and settings, at the stage's
             resolution) -> Cascade.__call__ (the base, then each upsampler) -> outputs

Outputs, each written to a temporary name and renamed (``pipelines/diffusion/pictures.py`` draws
them):

    sample-0000.png …      the samples, R×R RGB
    conditions/<name>.png  a picture of each condition used; maps at R×R exactly as the model got
                           them, so an edited copy goes back in with ``--<name>-map``
    grid.png               condition tiles above, samples below
    stages/<name>/sample-0000.png …   a cascade's earlier stages' samples (the base's, …)
    generate.json          arguments, seed, guidance, resolved scheduler and threshold, every file
                           with its sha256, wall time (a cascade: per stage, ``cascade``); written
                           last, it marks a finished run
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.conditions import MAPS, ExtractorUnavailable
from pipelines.config import to_dict
from pipelines.data.decomposer import ImageDecomposer
from pipelines.diffusion.cascade import Cascade, StageInputs, StageOutput
from pipelines.diffusion.loading import MODEL_URIS, REFERENCE_MODEL, load_cascade, resolve_device
from pipelines.files import claim_output, encode_png, write_bytes, write_json
from pipelines.generate.config import FROM_IMAGE, GenerateConfig, GenerateError, parse_palette

log = logging.getLogger(__name__)

FORMAT = "recompose.generate/1"
RECORD = "generate.json"
# What a run writes before its record: an interrupted run's directory may be generated into again.
_OUTPUTS = re.compile(r"sample-\d{4}\.png|grid\.png|conditions|stages|\..+\.tmp")
# Why a condition's picture looks as it does (generate.json's conditions.<name>.note).
_NOTES = {
    "caption": "text has no picture: it is in arguments.text and on grid.png",
    "semantics": "the image the semantics condition was taken from (none when the prior sampled it)",
    "palette": "bars of the palette's strongest bins (render_palette)",
    "instances": "colourised ids; --instances-map reads colours back as instances",
    "mask": "255 = regenerated; goes back in with --mask",
}
_OPTIONAL = (
    "invert_guidance",
    "inverted_from_source",
    "source",
    "cascade",
    "prior",
    "paint",
)  # in generate.json only when they apply


@dataclass(frozen=True)
class GenerateResult:
    """One finished generation: ``generate.json``, field for field (``to_dict``)."""

    format: str  # FORMAT
    model: str  # the directory (absolute) or the MLflow URI as given
    arguments: dict[str, Any]  # the GenerateConfig
    seed: int
    steps: int
    num_images: int
    resolution: int  # R: samples and maps are R×R
    scheduler: str
    threshold: str  # the x_0 thresholding used (the pipeline's default resolved)
    device: str
    guidance: dict[str, Any]  # {"text": --guidance, **Guidance.describe()}
    bidirectional: bool
    decompose: dict[str, Any]  # the pipeline's decomposition settings
    conditions: dict[str, Any]  # name -> {"from": flag and file, "picture": path or None[, "note"]}
    images: list[dict[str, str]]  # [{"file": "sample-0000.png", "sha256": …}, …]
    files: dict[str, str]  # every file written but the record -> sha256
    phases_s: dict[str, float]  # load_s, decompose_s, sample_s, write_s
    wall_time_s: float
    invert_guidance: dict[str, Any] | None = None  # --bidirectional: as guidance, of the inversion
    inverted_from_source: dict[str, str] | None = None  # --bidirectional: name -> where c1 came from
    source: dict[str, str] | None = None  # --source: {"from": path, "picture": path}
    cascade: list[dict[str, Any]] | None = None  # a cascade: per stage, its side, settings, time, images
    prior: dict[str, Any] | None = None  # --prior: its guidance, steps and the sampled embedding
    paint: dict[str, Any] | None = None  # --paint: weight and {phrase: {"from", "picture"}}

    def to_dict(self) -> dict[str, Any]:
        """The generate.json mapping: the optional keys only where they apply."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None or k not in _OPTIONAL}


@dataclass
class Inputs:
    """What the pipeline is called with, and where each condition came from."""

    conditions: dict[str, Any]  # model-input keys, pipelines/diffusion/inputs.py
    origins: dict[str, str]  # condition name -> the flag (and file) it came from
    source: np.ndarray | None = None  # (R, R, 3) uint8
    mask: np.ndarray | None = None  # (R, R) uint8 {0, 1}, 1 = regenerate
    invert_conditions: dict[str, Any] | None = None  # bidirectional: c1, decomposed from the source
    inverted: dict[str, str] | None = None  # name -> where the source's value came from
    references: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # e.g. semantics image
    paint: dict[str, np.ndarray] | None = None  # --paint: {phrase: (R, R) {0, 1} region}


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    """The whole command: check, load, decompose, sample, write; returns the ``generate.json`` record."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    previous = claim(out, cfg.overwrite)
    missing = [f"{flag} {p}" for flag, p in cfg.input_files().items() if not Path(p).is_file()]
    if missing:
        raise GenerateError("no such file: " + ", ".join(missing))
    device = resolve_device(cfg.device)
    phases: dict[str, float] = {}

    log.info("loading the pipeline from %s on %s", cfg.model, device)
    cascade = load_cascade(cfg.model, device)
    stages = cascade.upto(cfg.resolution)
    steps, guidance = cfg.stage_settings(len(stages) - 1)
    phases["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    given = sorted(cfg.given())
    side = stages[-1].image_size
    staged: list[Inputs] = []
    semantics = None
    if cfg.prior:
        log.info("sampling the semantics from the caption with the prior (%d steps)", cfg.prior_steps)
        dec = ImageDecomposer.for_pipeline(stages[0], device)
        semantics = cascade.sample_semantics(dec, cfg.text, cfg.prior_guidance, cfg.prior_steps, cfg.seed)
    for pipe in stages:  # each stage's conditions at its own resolution, decomposed as it was trained
        log.info("decomposing the inputs at %spx: %s", pipe.image_size, ", ".join(given) or "no conditions")
        try:
            inputs = build_inputs(cfg, ImageDecomposer.for_pipeline(pipe, device), side)
        except (ExtractorUnavailable, ValueError) as e:  # an image, map or extractor the flags named
            raise GenerateError(str(e)) from e
        if semantics is not None:
            inputs.conditions["semantics"] = semantics
            inputs.origins["semantics"] = "--prior (sampled from --text)"
        staged.append(inputs)
    phases["decompose_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sampled = sample(cfg, cascade, staged, steps, guidance)
    phases["sample_s"] = time.perf_counter() - t

    log.info("writing %s", out)
    prior = None
    if semantics is not None:  # the embedding the prior sampled, in the record
        prior = {"guidance": cfg.prior_guidance, "steps": cfg.prior_steps, "semantics": semantics.tolist()}
    result = write_outputs(cfg, cascade, device, staged[-1], sampled, phases, t0, prior)
    _remove_stale(out, previous, result.files)
    log.info("wrote %d image(s) and grid.png to %s in %.1f s", len(result.images), out, result.wall_time_s)
    return result


def claim(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse a finished generation's directory unless ``overwrite``, and any directory holding
    what no generation wrote; returns the earlier record (its files are replaced)."""
    previous = claim_output(out, RECORD, "generation", ours=lambda p: bool(_OUTPUTS.fullmatch(p.name)))
    if previous is not None and not overwrite:
        raise GenerateError(
            f"--output {out} already holds a generation ({RECORD}); pass --overwrite or choose another"
        )
    return previous


def build_inputs(cfg: GenerateConfig, dec: ImageDecomposer, output_side: int | None = None) -> Inputs:
    """The flags -> condition inputs at ``dec``'s resolution: decomposed "from" images, maps as
    given, hex palettes; ``output_side``: the side of the whole generation (a cascade's last
    stage), on which an ``--outpaint`` canvas is laid out."""
    from pipelines.conditions.palette import palette_from_hex

    cache: dict[str, np.ndarray] = {}

    def image(path: str) -> np.ndarray:  # each file decoded once, however many flags name it
        if path not in cache:
            cache[path] = dec.load_image(path)
        return cache[path]

    inputs = Inputs(conditions={}, origins={})
    if cfg.text is not None:
        inputs.conditions.update(dec.caption(cfg.text))
        inputs.origins["caption"] = "--text"
    if cfg.palette is not None:
        colours, weights = parse_palette(cfg.palette)
        inputs.conditions["palette"] = palette_from_hex(colours, weights, sigma=dec.config.palette.sigma)
        inputs.origins["palette"] = f"--palette {cfg.palette}"
    for name in FROM_IMAGE:  # decomposed from an image, or (maps only) a map used as it is
        path = getattr(cfg, f"{name}_from")
        if path:
            inputs.conditions.update(dec.decompose(image(path), [name]))
            inputs.origins[name] = f"--{name}-from {path}"
            if name == "semantics":
                inputs.references["semantics"] = image(path)
        path = getattr(cfg, f"{name}_map", None) if name in MAPS else None
        if path:
            inputs.conditions[name] = dec.load_map(name, path)
            inputs.origins[name] = f"--{name}-map {path}"
    if cfg.outpaint is not None:
        _outpaint_inputs(cfg, dec, inputs, output_side or dec.resolution)
    elif cfg.source:
        inputs.source = image(cfg.source)
    if cfg.mask:
        inputs.mask = dec.load_mask(cfg.mask)
        inputs.origins["mask"] = f"--mask {cfg.mask} --source {cfg.source}"
    if cfg.bidirectional:
        _invert_inputs(cfg, dec, inputs)
    if cfg.paint:  # at this stage's side, framed as an image (as --mask)
        inputs.paint = {phrase: dec.load_mask(path) for phrase, path in cfg.paint_regions().items()}
    return inputs


def _outpaint_inputs(cfg: GenerateConfig, dec: ImageDecomposer, inputs: Inputs, side: int) -> None:
    """--outpaint: the source on the output canvas, the new border as the mask, both brought to
    this stage's resolution (pipelines/diffusion/outpaint.py)."""
    from pipelines.diffusion.cascade import resize_for_stage
    from pipelines.diffusion.outpaint import inner_box, outpaint_canvas, parse_outpaint

    pad = parse_outpaint(cfg.outpaint)
    image = dec.load_image_as_is(cfg.source)
    _, _, w, h = inner_box(pad, side)
    if image.shape[:2] != (h, w) and dec.resolution == side:
        log.info(
            "--outpaint: the source is %dx%d, resized to the %dx%d box it keeps", *image.shape[1::-1], w, h
        )
    canvas, mask = outpaint_canvas(image, pad, side)
    inputs.source = resize_for_stage("image", canvas, dec.resolution)
    inputs.mask = resize_for_stage("mask", mask, dec.resolution)
    inputs.origins["mask"] = f"--outpaint {cfg.outpaint} --source {cfg.source}"


def _invert_inputs(cfg: GenerateConfig, dec: ImageDecomposer, inputs: Inputs) -> None:
    """Composer §3.2: c1 = the same condition names, valued as the source decomposes."""
    names = [n for n in inputs.origins if n != "mask"]
    text = cfg.source_text if cfg.source_text is not None else cfg.text
    inputs.invert_conditions = dec.decompose(inputs.source, names, text)
    caption_flag = "--source-text" if cfg.source_text is not None else "--text"
    inputs.inverted = {n: caption_flag if n == "caption" else f"{n} of --source {cfg.source}" for n in names}


def sample(
    cfg: GenerateConfig, cascade: Cascade, staged: list[Inputs], steps: list[int], guidance: list[str]
) -> list[StageOutput]:
    """``cfg.num_images`` samples through every stage; the pipeline's input errors name what to change."""
    mode = " (bidirectional: inverting the source first)" if cfg.bidirectional else ""

    def on_stage(i: int, side: int) -> None:
        log.info(
            "stage %d/%d (%s, %d px): sampling %d image(s), %d %s steps, guidance %s%s",
            i + 1,
            len(staged),
            cascade.names[i],
            side,
            cfg.num_images,
            steps[i],
            cfg.scheduler,
            guidance[i],
            mode,
        )

    stage_inputs = [
        StageInputs(
            conditions=inputs.conditions,
            guidance=g,
            steps=n,
            source=inputs.source,
            mask=inputs.mask,
            invert_conditions=inputs.invert_conditions,
            invert_guidance=cfg.invert_guidance,
            level=cfg.low_res_level,
            paint=inputs.paint,
            paint_weight=cfg.paint_weight,
            paint_caption=cfg.text,
        )
        for inputs, n, g in zip(staged, steps, guidance, strict=True)
    ]
    try:
        return cascade(stage_inputs, cfg.num_images, cfg.seed, cfg.scheduler, cfg.threshold, on_stage)
    except ValueError as e:  # e.g. --threshold clip for a latent-space model
        raise GenerateError(str(e)) from e


def write_outputs(
    cfg: GenerateConfig,
    cascade: Cascade,
    device: str,
    inputs: Inputs,
    stages: list[StageOutput],
    phases: dict[str, float],
    t0: float,
    prior: dict[str, Any] | None = None,
) -> GenerateResult:
    """Samples, condition pictures, grid, a cascade's earlier stages, then ``generate.json``;
    returns its record."""
    t = time.perf_counter()
    out = Path(cfg.output)
    sampled = stages[-1]
    files, pictures = _write_pictures(out, cfg, inputs, sampled.images, sampled.resolution)
    samples = [f"sample-{i:04d}.png" for i in range(len(sampled.images))]
    record = None
    if len(stages) > 1:
        record = _stage_records(out, cfg, cascade.names, stages, samples, files)
    phases["write_s"] = time.perf_counter() - t
    pipe = cascade.stages[len(stages) - 1]
    result = GenerateResult(
        format=FORMAT,
        model=cfg.model
        if cfg.model.startswith(MODEL_URIS) or cfg.model == REFERENCE_MODEL
        else str(Path(cfg.model).resolve()),
        arguments=to_dict(cfg),
        seed=cfg.seed,
        steps=cfg.steps,
        num_images=cfg.num_images,
        resolution=sampled.resolution,
        scheduler=cfg.scheduler,
        threshold=sampled.threshold,
        device=device,
        guidance={"text": cfg.guidance, **sampled.guidance},
        bidirectional=cfg.bidirectional,
        decompose=pipe.config.decompose,
        conditions=_condition_entries(inputs, pictures),
        images=[{"file": n, "sha256": files[n]} for n in samples],
        files=files,
        phases_s={k: round(v, 3) for k, v in phases.items()},
        wall_time_s=round(time.perf_counter() - t0, 3),
        invert_guidance={"text": cfg.invert_guidance, **sampled.invert_guidance}
        if cfg.bidirectional
        else None,
        inverted_from_source=inputs.inverted if cfg.bidirectional else None,
        source={"from": cfg.source, "picture": "conditions/source.png"}
        if inputs.source is not None
        else None,
        cascade=record,
        prior=prior,
        paint={
            "weight": cfg.paint_weight,
            "phrases": {
                phrase: {"from": path, "picture": f"conditions/paint-{k}.png"}
                for k, (phrase, path) in enumerate(cfg.paint_regions().items())
            },
        }
        if cfg.paint
        else None,
    )
    write_json(result.to_dict(), out / RECORD)
    return result


def _stage_records(
    out: Path,
    cfg: GenerateConfig,
    names: list[str],
    stages: list[StageOutput],
    samples: list[str],
    files: dict[str, str],
) -> list[dict[str, Any]]:
    """A cascade's earlier stages' samples (stages/<name>/sample-*.png; the last stage's are the
    samples) and generate.json's ``cascade``: per stage its side, settings, time and images."""
    steps, guidance = cfg.stage_settings(len(stages) - 1)
    record = []
    for i, stage in enumerate(stages):
        images = samples
        if i < len(stages) - 1:
            images = [f"stages/{names[i]}/sample-{j:04d}.png" for j in range(len(stage.images))]
            for name, im in zip(images, stage.images, strict=True):
                data = encode_png(im)
                write_bytes(data, out / name)
                files[name] = hashlib.sha256(data).hexdigest()
        record.append(
            {
                "stage": names[i],
                "resolution": stage.resolution,
                "steps": steps[i],
                "guidance": {"text": guidance[i], **stage.guidance},
                "low_res_level": cfg.low_res_level if i else None,
                "sample_s": round(stage.seconds, 3),
                "images": images,
            }
        )
    return record


def _write_pictures(
    out: Path, cfg: GenerateConfig, inputs: Inputs, images: np.ndarray, resolution: int
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """sample-*.png, conditions/*.png and grid.png; returns (file -> sha256, the pictures by name)."""
    from pipelines.diffusion.pictures import condition_pictures, grid

    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        write_bytes(data, out / name)
        files[name] = hashlib.sha256(data).hexdigest()

    for i, im in enumerate(images):
        put(f"sample-{i:04d}.png", encode_png(im))
    pictures = condition_pictures(inputs.conditions, inputs.source, inputs.mask, inputs.references)
    for name, picture in pictures.items():
        put(f"conditions/{name}.png", encode_png(picture))
    for k, region in enumerate((inputs.paint or {}).values()):  # white = painted, as given
        put(f"conditions/paint-{k}.png", encode_png((np.asarray(region) > 0).astype(np.uint8) * 255))
    text = cfg.text if "caption" in inputs.origins else None
    put("grid.png", encode_png(grid(pictures, text, images, resolution)))
    return files, pictures


def _condition_entries(inputs: Inputs, pictures: dict[str, np.ndarray]) -> dict[str, Any]:
    """generate.json's ``conditions``: where each came from, its picture, a note on reading it."""
    return {
        name: {
            "from": origin,
            "picture": f"conditions/{name}.png" if name in pictures else None,
            **({"note": _NOTES[name]} if name in _NOTES else {}),
        }
        for name, origin in inputs.origins.items()
    }


def _remove_stale(out: Path, previous: dict[str, Any] | None, kept: dict[str, str]) -> None:
    """After ``--overwrite``: delete the files the previous run wrote that this one did not."""
    root = out.resolve()
    for name in (previous or {}).get("files", {}):
        p = (out / name).resolve()
        if name not in kept and p.is_file() and root in p.parents:
            p.unlink()
