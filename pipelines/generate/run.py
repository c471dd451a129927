"""``recompose generate``: conditions from command-line flags -> samples, pictures and a record.

    flags -> GenerateRequest (checked before anything is loaded)
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
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np

from pipelines.data.decomposer import MAPS, ImageDecomposer
from pipelines.diffusion.loading import MODEL_URIS, load_pipeline, resolve_device
from pipelines.errors import UserError
from pipelines.files import write_bytes, write_json

if TYPE_CHECKING:
    pass

FORMAT = "recompose.generate/1"
RECORD = "generate.json"
# Conditions a flag can take "from an image" (decomposed) and "as a map" (used as is).
FROM_IMAGE = ("semantics", "palette", "sketch", "instances", "depth", "intensity")


class GenerateError(UserError):
    """A bad flag, input file or output directory; the message names it."""


def parse_palette(spec: str) -> tuple[list[str], list[float] | None]:
    """``'#ff0000,#00ff00'`` or ``'#ff0000:3,#00ff00:1'`` (weights) -> (colours, weights or None)."""
    from pipelines.conditions.palette import parse_hex

    colours, weights = [], []
    for item in spec.split(","):
        colour, sep, weight = item.strip().partition(":")
        try:
            parse_hex(colour)
            weights.append(float(weight) if sep else 1.0)
        except ValueError as e:
            raise GenerateError(
                f"--palette {spec!r}: {item.strip()!r} is not COLOUR[:WEIGHT] with a hex colour ({e})"
            ) from None
        colours.append(colour)
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GenerateError(f"--palette {spec!r}: weights must be >= 0 with a positive sum")
    return colours, (weights if any(":" in i for i in spec.split(",")) else None)


@dataclass(frozen=True)
class GenerateRequest:
    """The command's flags (``jobs/generate.py`` documents each); checked in ``__post_init__``."""

    model: str
    output: str
    text: str | None = None
    palette: str | None = None  # hex colours, '#ff0000,#00ff00' (optionally COLOUR:WEIGHT)
    palette_from: str | None = None
    semantics_from: str | None = None
    sketch_from: str | None = None
    instances_from: str | None = None
    depth_from: str | None = None
    intensity_from: str | None = None
    sketch_map: str | None = None
    instances_map: str | None = None
    depth_map: str | None = None
    intensity_map: str | None = None
    mask: str | None = None
    source: str | None = None
    source_text: str | None = None
    bidirectional: bool = False
    guidance: str = "3"  # Composer's Eq. 2 text form, pipelines/diffusion/guidance.py
    invert_guidance: str = "1"  # the inversion's guidance; 1 = the plain conditional model
    steps: int = 50
    seed: int = 0
    num_images: int = 1
    scheduler: Literal["ddim", "dpm++"] = "ddim"
    threshold: Literal["clip", "dynamic", "none"] | None = None  # None: the pipeline's default
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        from pipelines.diffusion.guidance import Guidance
        from pipelines.diffusion.pipeline import SCHEDULERS, THRESHOLDS

        if not self.model or not self.output:
            raise GenerateError("--model and --output are required")
        if self.steps < 1 or self.num_images < 1:
            raise GenerateError(
                f"--steps and --num-images must be >= 1, got {self.steps} and {self.num_images}"
            )
        if self.seed < 0:
            raise GenerateError(f"--seed must be >= 0, got {self.seed}")
        if self.scheduler not in SCHEDULERS:
            raise GenerateError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if self.threshold is not None and self.threshold not in THRESHOLDS:
            raise GenerateError(f"--threshold {self.threshold!r}: expected one of {', '.join(THRESHOLDS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise GenerateError(f"--device {self.device!r}: expected auto, cpu or cuda")
        for name in MAPS:
            if getattr(self, f"{name}_from") and getattr(self, f"{name}_map"):
                raise GenerateError(f"give --{name}-from or --{name}-map, not both")
        if self.palette is not None:
            if self.palette_from:
                raise GenerateError("give --palette or --palette-from, not both")
            parse_palette(self.palette)
        if self.mask and not self.source:
            raise GenerateError("--mask needs --source: the image whose masked region is regenerated")
        if self.bidirectional and not self.source:
            raise GenerateError("--bidirectional needs --source: the image to invert")
        if self.bidirectional and self.scheduler != "ddim":
            raise GenerateError("--bidirectional inverts with DDIM; use --scheduler ddim")
        if self.source and not (self.mask or self.bidirectional):
            raise GenerateError("--source is used by --mask and --bidirectional; give one of them")
        if self.source_text is not None and not (self.bidirectional and self.text is not None):
            raise GenerateError("--source-text is the source's caption for --bidirectional with --text")
        checks = [("--guidance", self.guidance, self.given())]
        if self.bidirectional:  # the inversion runs under the same names, less the mask
            checks.append(("--invert-guidance", self.invert_guidance, self.given() - {"mask"}))
        for flag, spec, names in checks:
            try:
                Guidance.parse(spec, names)
            except ValueError as e:
                raise GenerateError(f"{flag}: {e}") from None

    def given(self) -> frozenset[str]:
        """The condition names the flags give."""
        names = {n for n in FROM_IMAGE if getattr(self, f"{n}_from")}
        names |= {n for n in MAPS if getattr(self, f"{n}_map")}
        if self.text is not None:
            names.add("caption")
        if self.palette is not None:
            names.add("palette")
        if self.mask:
            names.add("mask")
        return frozenset(names)

    def input_files(self) -> dict[str, str]:
        """flag -> path of every file the flags name."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.endswith(("_from", "_map")) or f.name in ("mask", "source"):
                value = getattr(self, f.name)
                if value:
                    out["--" + f.name.replace("_", "-")] = value
        return out


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


def check_output(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse a finished run's directory unless ``overwrite``; returns that run's record."""
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--output {out}: exists and is not a directory")
    record = out / RECORD
    if not record.is_file():
        return None
    if not overwrite:
        raise GenerateError(
            f"--output {out} already holds a generation ({RECORD}); pass --overwrite or choose another"
        )
    try:
        return json.loads(record.read_text())
    except ValueError:
        return None


def build_inputs(req: GenerateRequest, dec: ImageDecomposer) -> Inputs:
    """The flags -> condition inputs: decomposed "from" images, maps as given, hex palettes."""
    from pipelines.conditions.palette import palette_from_hex

    cache: dict[str, np.ndarray] = {}

    def image(path: str) -> np.ndarray:  # each file decoded once, however many flags name it
        if path not in cache:
            cache[path] = dec.load_image(path)
        return cache[path]

    inputs = Inputs(conditions={}, origins={})
    if req.text is not None:
        inputs.conditions.update(dec.caption(req.text))
        inputs.origins["caption"] = "--text"
    if req.palette is not None:
        colours, weights = parse_palette(req.palette)
        inputs.conditions["palette"] = palette_from_hex(colours, weights, sigma=dec.config.palette.sigma)
        inputs.origins["palette"] = f"--palette {req.palette}"
    for name in FROM_IMAGE:  # decomposed from an image, or (maps only) a map used as it is
        path = getattr(req, f"{name}_from")
        if path:
            inputs.conditions.update(dec.decompose(image(path), [name]))
            inputs.origins[name] = f"--{name}-from {path}"
            if name == "semantics":
                inputs.references["semantics"] = image(path)
        path = getattr(req, f"{name}_map", None)
        if path:
            inputs.conditions[name] = dec.load_map(name, path)
            inputs.origins[name] = f"--{name}-map {path}"
    if req.source:
        inputs.source = image(req.source)
    if req.mask:
        inputs.mask = dec.load_mask(req.mask)
        inputs.origins["mask"] = f"--mask {req.mask} --source {req.source}"
    if req.bidirectional:
        # Composer §3.2: c1 = the same condition names, valued as the source decomposes.
        names = [n for n in inputs.origins if n != "mask"]
        text = req.source_text if req.source_text is not None else req.text
        inputs.invert_conditions = dec.decompose(inputs.source, names, text)
        inputs.inverted = {
            n: ("--source-text" if req.source_text is not None else "--text")
            if n == "caption"
            else f"{n} of --source {req.source}"
            for n in names
        }
    return inputs


def run_generate(req: GenerateRequest, log: TextIO | None = None) -> dict[str, Any]:
    """The whole command; progress lines go to ``log`` (stderr); returns the ``generate.json`` record."""
    t0 = time.perf_counter()
    out = Path(req.output)
    previous = check_output(out, req.overwrite)
    missing = [f"{flag} {p}" for flag, p in req.input_files().items() if not Path(p).is_file()]
    if missing:
        raise GenerateError("no such file: " + ", ".join(missing))
    device = resolve_device(req.device)
    phases: dict[str, float] = {}

    def say(msg: str) -> None:
        print(f"[generate] {msg}", file=log or sys.stderr, flush=True)

    say(f"loading the pipeline from {req.model} on {device}")
    pipe = load_pipeline(req.model, device)
    phases["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    given = sorted(req.given())
    say(f"decomposing the inputs at {pipe.image_size}px: {', '.join(given) or 'no conditions'}")
    inputs = build_inputs(req, ImageDecomposer.for_pipeline(pipe, device))
    phases["decompose_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mode = " (bidirectional: inverting the source first)" if req.bidirectional else ""
    say(
        f"sampling {req.num_images} image(s), {req.steps} {req.scheduler} steps, guidance {req.guidance}{mode}"
    )
    result = pipe(
        conditions=inputs.conditions,
        guidance=req.guidance,
        num_inference_steps=req.steps,
        num_images=req.num_images,
        seed=req.seed,
        source=inputs.source,
        mask=inputs.mask,
        invert_conditions=inputs.invert_conditions,
        invert_guidance=req.invert_guidance,
        scheduler=req.scheduler,
        threshold=req.threshold,
    )
    phases["sample_s"] = time.perf_counter() - t

    say(f"writing {out}")
    record = {
        "format": FORMAT,
        "model": req.model if req.model.startswith(MODEL_URIS) else str(Path(req.model).resolve()),
        "arguments": dataclasses.asdict(req),
        "seed": req.seed,
        "steps": req.steps,
        "num_images": req.num_images,
        "resolution": pipe.image_size,
        "scheduler": req.scheduler,
        "threshold": result.threshold,
        "device": device,
        "guidance": {"text": req.guidance, **result.guidance},
        "bidirectional": req.bidirectional,
        "decompose": pipe.config.decompose,
    }
    if req.bidirectional:
        record["invert_guidance"] = {"text": req.invert_guidance, **result.invert_guidance}
        record["inverted_from_source"] = inputs.inverted
    return write_outputs(out, record, inputs, result.images, previous, t0, phases)


def write_outputs(
    out: Path,
    record: dict[str, Any],
    inputs: Inputs,
    images: np.ndarray,
    previous: dict[str, Any] | None,
    t0: float,
    phases: dict[str, float],
) -> dict[str, Any]:
    """Samples, condition pictures, grid, then ``generate.json``; returns the record."""
    import hashlib

    from pipelines.diffusion.pictures import condition_pictures, grid
    from pipelines.files import encode_png as png

    t = time.perf_counter()
    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        write_bytes(data, out / name)
        files[name] = hashlib.sha256(data).hexdigest()

    samples = [f"sample-{i:04d}.png" for i in range(len(images))]
    for name, im in zip(samples, images, strict=True):
        put(name, png(im))
    pictures = condition_pictures(inputs.conditions, inputs.source, inputs.mask, inputs.references)
    for name, picture in pictures.items():
        put(f"conditions/{name}.png", png(picture))
    text = None
    if "caption" in inputs.origins:
        text = record["arguments"]["text"]
    put("grid.png", png(grid(pictures, text, images, record["resolution"])))

    notes = {
        "caption": "text has no picture: it is in arguments.text and on grid.png",
        "semantics": "the image the semantics condition was taken from",
        "palette": "bars of the palette's strongest bins (render_palette)",
        "instances": "colourised ids; --instances-map reads colours back as instances",
        "mask": "255 = regenerated; goes back in with --mask",
    }
    record["conditions"] = {
        name: {
            "from": origin,
            "picture": f"conditions/{name}.png" if name in pictures else None,
            **({"note": notes[name]} if name in notes else {}),
        }
        for name, origin in inputs.origins.items()
    }
    if inputs.source is not None:
        record["source"] = {"from": record["arguments"]["source"], "picture": "conditions/source.png"}
    record["images"] = [{"file": n, "sha256": files[n]} for n in samples]
    record["files"] = files
    phases["write_s"] = time.perf_counter() - t
    record["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
    record["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_json(record, out / RECORD)
    _remove_stale(out, previous, files)
    return record


def _remove_stale(out: Path, previous: dict[str, Any] | None, kept: dict[str, str]) -> None:
    """After ``--overwrite``: delete the files the previous run wrote that this one did not."""
    root = out.resolve()
    for name in (previous or {}).get("files", {}):
        p = (out / name).resolve()
        if name not in kept and p.is_file() and root in p.parents:
            p.unlink()
