"""``recompose generate``: conditions from command-line flags -> samples, pictures and a record.

    GenerateConfig (checked before anything is loaded; pipelines/generate/config.py)
          -> ComposerPipeline.from_pretrained -> conditions (ImageDecomposer: the training
             shards' extractors and settings) -> ComposerPipeline.__call__ -> outputs

Outputs, each written to a temporary name and renamed (``pipelines/diffusion/pictures.py`` draws
them):

    sample-0000.png …      the samples, R×R RGB
    conditions/<name>.png  a picture of each condition used; maps at R×R exactly as the model got
                           them, so an edited copy goes back in with ``--<name>-map``
    grid.png               condition tiles above, samples below
    generate.json          arguments, seed, guidance, resolved scheduler and threshold, every file
                           with its sha256, wall time; written last, it marks a finished run
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
from pipelines.diffusion.loading import MODEL_URIS, REFERENCE_MODEL, load_pipeline, resolve_device
from pipelines.diffusion.pipeline import ComposerOutput, ComposerPipeline
from pipelines.files import claim_output, encode_png, write_bytes, write_json
from pipelines.generate.config import FROM_IMAGE, GenerateConfig, GenerateError, parse_palette

log = logging.getLogger(__name__)

FORMAT = "recompose.generate/1"
RECORD = "generate.json"
# What a run writes before its record: an interrupted run's directory may be generated into again.
_OUTPUTS = re.compile(r"sample-\d{4}\.png|grid\.png|conditions|\..+\.tmp")
# Why a condition's picture looks as it does (generate.json's conditions.<name>.note).
_NOTES = {
    "caption": "text has no picture: it is in arguments.text and on grid.png",
    "semantics": "the image the semantics condition was taken from",
    "palette": "bars of the palette's strongest bins (render_palette)",
    "instances": "colourised ids; --instances-map reads colours back as instances",
    "mask": "255 = regenerated; goes back in with --mask",
}
_OPTIONAL = ("invert_guidance", "inverted_from_source", "source")  # in generate.json only when they apply


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
    pipe = load_pipeline(cfg.model, device)
    phases["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    given = sorted(cfg.given())
    log.info("decomposing the inputs at %spx: %s", pipe.image_size, ", ".join(given) or "no conditions")
    try:
        inputs = build_inputs(cfg, ImageDecomposer.for_pipeline(pipe, device))
    except (ExtractorUnavailable, ValueError) as e:  # an image, map or extractor the flags named
        raise GenerateError(str(e)) from e
    phases["decompose_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sampled = sample(cfg, pipe, inputs)
    phases["sample_s"] = time.perf_counter() - t

    log.info("writing %s", out)
    result = write_outputs(cfg, pipe, device, inputs, sampled, phases, t0)
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


def build_inputs(cfg: GenerateConfig, dec: ImageDecomposer) -> Inputs:
    """The flags -> condition inputs: decomposed "from" images, maps as given, hex palettes."""
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
    if cfg.source:
        inputs.source = image(cfg.source)
    if cfg.mask:
        inputs.mask = dec.load_mask(cfg.mask)
        inputs.origins["mask"] = f"--mask {cfg.mask} --source {cfg.source}"
    if cfg.bidirectional:
        _invert_inputs(cfg, dec, inputs)
    return inputs


def _invert_inputs(cfg: GenerateConfig, dec: ImageDecomposer, inputs: Inputs) -> None:
    """Composer §3.2: c1 = the same condition names, valued as the source decomposes."""
    names = [n for n in inputs.origins if n != "mask"]
    text = cfg.source_text if cfg.source_text is not None else cfg.text
    inputs.invert_conditions = dec.decompose(inputs.source, names, text)
    caption_flag = "--source-text" if cfg.source_text is not None else "--text"
    inputs.inverted = {n: caption_flag if n == "caption" else f"{n} of --source {cfg.source}" for n in names}


def sample(cfg: GenerateConfig, pipe: ComposerPipeline, inputs: Inputs) -> ComposerOutput:
    """``cfg.num_images`` samples of ``inputs``; the pipeline's input errors name what to change."""
    mode = " (bidirectional: inverting the source first)" if cfg.bidirectional else ""
    log.info(
        "sampling %d image(s), %d %s steps, guidance %s%s",
        cfg.num_images,
        cfg.steps,
        cfg.scheduler,
        cfg.guidance,
        mode,
    )
    try:
        return pipe(
            conditions=inputs.conditions,
            guidance=cfg.guidance,
            num_inference_steps=cfg.steps,
            num_images=cfg.num_images,
            seed=cfg.seed,
            source=inputs.source,
            mask=inputs.mask,
            invert_conditions=inputs.invert_conditions,
            invert_guidance=cfg.invert_guidance,
            scheduler=cfg.scheduler,
            threshold=cfg.threshold,
        )
    except ValueError as e:  # e.g. --threshold clip for a latent-space model
        raise GenerateError(str(e)) from e


def write_outputs(
    cfg: GenerateConfig,
    pipe: ComposerPipeline,
    device: str,
    inputs: Inputs,
    sampled: ComposerOutput,
    phases: dict[str, float],
    t0: float,
) -> GenerateResult:
    """Samples, condition pictures, grid, then ``generate.json``; returns its record."""
    t = time.perf_counter()
    out = Path(cfg.output)
    files, pictures = _write_pictures(out, cfg, inputs, sampled.images, pipe.image_size)
    samples = [f"sample-{i:04d}.png" for i in range(len(sampled.images))]
    phases["write_s"] = time.perf_counter() - t
    result = GenerateResult(
        format=FORMAT,
        model=cfg.model
        if cfg.model.startswith(MODEL_URIS) or cfg.model == REFERENCE_MODEL
        else str(Path(cfg.model).resolve()),
        arguments=to_dict(cfg),
        seed=cfg.seed,
        steps=cfg.steps,
        num_images=cfg.num_images,
        resolution=pipe.image_size,
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
    )
    write_json(result.to_dict(), out / RECORD)
    return result


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
