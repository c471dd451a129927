"""``recompose generate``'s settings: one frozen config, from flags, a YAML file and ``--set``.

Every field is a flag of the same name (``num_images`` is ``--num-images``); ``jobs/generate.py``
says what each does. The whole config is recorded in ``generate.json`` as ``arguments``. Checks
that need no file are made here, before a model is loaded: ranges as ``Field`` constraints,
combinations of flags and guidance that names a condition no flag gives in ``_check``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.conditions import MAPS
from pipelines.config import Config, ConfigError, load_config, parse_overrides, resource
from pipelines.diffusion.loading import REFERENCE_MODEL
from pipelines.diffusion.schedulers import SchedulerName, Threshold
from pipelines.errors import UserError

# Conditions a flag can take "from an image" (decomposed); MAPS can also come "as a map" (as is).
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


class GenerateConfig(Config):
    """The command's flags, one per field (its description is the flag's help); the files named
    here are read by ``run_generate``."""

    model: str = Field(
        REFERENCE_MODEL,
        description="a saved ComposerPipeline directory, or a registered model models:/<name>/<version> "
        "(or models:/<name>@<alias>, runs:/<run id>/<path>) from the MLflow server in MLFLOW_TRACKING_URI; "
        f"default {REFERENCE_MODEL}, the reference model shipped with recompose",
    )
    output: str = resource("", description="output directory (samples, conditions/, grid.png, generate.json)")
    text: str | None = Field(None, description="the caption")
    palette: str | None = Field(
        None, description="hex colours, '#ff0000,#00ff00' (or weighted, '#ff0000:3,…')"
    )
    palette_from: str | None = Field(None, description="decompose the palette from this image")
    semantics_from: str | None = Field(None, description="decompose semantics from this image")
    sketch_from: str | None = Field(None, description="decompose a sketch from this image")
    instances_from: str | None = Field(None, description="decompose instances from this image")
    depth_from: str | None = Field(None, description="decompose depth from this image")
    intensity_from: str | None = Field(None, description="decompose intensity from this image")
    sketch_map: str | None = Field(
        None, description="a ready sketch map (e.g. an edited conditions/sketch.png)"
    )
    instances_map: str | None = Field(None, description="a ready instances map (ids, or colours as drawn)")
    depth_map: str | None = Field(None, description="a ready depth map (e.g. an edited conditions/depth.png)")
    intensity_map: str | None = Field(None, description="a ready intensity map")
    mask: str | None = Field(None, description="edit mask, white = regenerate (needs --source)")
    source: str | None = Field(
        None, description="the image to edit (--mask), extend (--outpaint) or invert (--bidirectional)"
    )
    outpaint: str | None = Field(
        None,
        description="extend --source's canvas by output pixels, 'left=L,right=R,top=T,bottom=B' "
        "(sides left out are 0); the source's pixels are kept exactly",
    )
    source_text: str | None = Field(
        None, description="the source's caption for --bidirectional (unset: --text)"
    )
    bidirectional: bool = Field(False, description="invert --source under its own conditions first")
    paint: list[str] = Field(
        default_factory=list,
        description="paint-with-words: 'PHRASE=IMG', a phrase of --text and a mask picture (white = "
        "where it goes); repeat per phrase",
    )
    paint_weight: float = Field(1.0, ge=0, description="how strongly painted phrases attend to their regions")
    prior: bool = Field(
        False, description="sample the semantics from --text with the cascade's prior (no --semantics-from)"
    )
    prior_guidance: float = Field(4.0, ge=0, description="the prior's guidance scale")
    prior_steps: int = Field(50, ge=1, description="the prior's denoising steps")
    guidance: str = Field("3", description="a scale, or per condition: 'text=5,sketch=2' (Composer Eq. 2)")
    invert_guidance: str = Field("1", description="guidance of the --bidirectional inversion; 1 = plain")
    steps: int = Field(50, ge=1, description="denoising steps (of a cascade's base)")
    resolution: int | None = Field(
        None, ge=1, description="output side: how far a cascade runs (unset: its last stage)"
    )
    upsampler_steps: str = Field("20", description="a cascade's upsampler steps: N, or N1,N2,… per upsampler")
    upsampler_guidance: str = Field(
        "3", description="a cascade's upsampler guidance: as --guidance, or one per upsampler joined by ';'"
    )
    low_res_level: int = Field(
        0, ge=0, le=999, description="a cascade's upsamplers: noise-augmentation level of their input"
    )
    seed: int = Field(0, ge=0, description="same seed, same images")
    num_images: int = Field(1, ge=1, description="samples to draw")
    scheduler: SchedulerName = Field("ddim", description="the sampler")
    threshold: Threshold | None = Field(
        None, description="x_0 thresholding; unset: clip in pixel space, none for latents and inversion"
    )
    overwrite: bool = resource(False, description="replace a generation in --output")
    device: Literal["auto", "cpu", "cuda"] = resource("auto", description="where to sample")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if not self.model or not self.output:
            raise GenerateError("--output is required (and --model, when given, must not be empty)")
        for name in MAPS:
            if getattr(self, f"{name}_from") and getattr(self, f"{name}_map"):
                raise GenerateError(f"give --{name}-from or --{name}-map, not both")
        if self.palette is not None:
            if self.palette_from:
                raise GenerateError("give --palette or --palette-from, not both")
            parse_palette(self.palette)
        if self.prior and (self.text is None or self.semantics_from):
            raise GenerateError(
                "--prior samples the semantics from --text: give --text and no --semantics-from"
            )
        self._check_source()
        self._check_guidance()
        self.paint_regions()
        self.stage_settings(0)  # the per-upsampler values parse (their count is checked on the cascade)
        return self

    def paint_regions(self) -> dict[str, str]:
        """--paint as {phrase: mask picture}; each phrase once, and only with --text."""
        out: dict[str, str] = {}
        for item in self.paint:
            phrase, sep, path = item.rpartition("=")
            if not sep or not phrase.strip() or not path.strip():
                raise GenerateError(f"--paint {item!r}: expected 'PHRASE=IMG', e.g. 'red circle=left.png'")
            if phrase.strip() in out:
                raise GenerateError(f"--paint names {phrase.strip()!r} twice")
            out[phrase.strip()] = path.strip()
        if out and self.text is None:
            raise GenerateError("--paint paints phrases of the caption: give --text")
        return out

    def _check_source(self) -> None:
        """--source goes with --mask (an edit), --outpaint or --bidirectional (an inversion)."""
        if self.outpaint is not None:
            from pipelines.diffusion.outpaint import parse_outpaint

            try:
                parse_outpaint(self.outpaint)
            except ValueError as e:
                raise GenerateError(f"--outpaint: {e}") from None
            if not self.source:
                raise GenerateError("--outpaint needs --source: the image to extend")
            if self.mask or self.bidirectional:
                raise GenerateError(
                    "--outpaint makes its own mask: give it without --mask and --bidirectional"
                )
            return
        if self.mask and not self.source:
            raise GenerateError("--mask needs --source: the image whose masked region is regenerated")
        if self.bidirectional and not self.source:
            raise GenerateError("--bidirectional needs --source: the image to invert")
        if self.bidirectional and self.scheduler != "ddim":
            raise GenerateError("--bidirectional inverts with DDIM; use --scheduler ddim")
        if self.source and not (self.mask or self.bidirectional):
            raise GenerateError(
                "--source is used by --mask, --outpaint and --bidirectional; give one of them"
            )
        if self.source_text is not None and not (self.bidirectional and self.text is not None):
            raise GenerateError("--source-text is the source's caption for --bidirectional with --text")

    def _check_guidance(self) -> None:
        """The guidance names only conditions the flags give."""
        from pipelines.diffusion.guidance import Guidance

        checks = [("--guidance", self.guidance, self.given())]
        checks += [("--upsampler-guidance", g, self.given()) for g in self.upsampler_guidance.split(";")]
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
        if self.prior:
            names.add("semantics")
        names |= {n for n in MAPS if getattr(self, f"{n}_map")}
        if self.text is not None:
            names.add("caption")
        if self.palette is not None:
            names.add("palette")
        if self.mask or self.outpaint is not None:
            names.add("mask")
        return frozenset(names)

    def stage_settings(self, upsamplers: int) -> tuple[list[int], list[str]]:
        """(steps, guidance) of every stage of a cascade with ``upsamplers`` upsamplers, base first."""
        steps = [s.strip() for s in self.upsampler_steps.split(",")]
        guidance = [g.strip() for g in self.upsampler_guidance.split(";")]
        for flag_, values in (("--upsampler-steps", steps), ("--upsampler-guidance", guidance)):
            if len(values) not in (1, upsamplers) and upsamplers:
                raise GenerateError(
                    f"{flag_}: {len(values)} values for a cascade with {upsamplers} upsampler(s); give one or {upsamplers}"
                )
        try:
            numbers = [int(s) for s in steps]
        except ValueError:
            raise GenerateError(f"--upsampler-steps {self.upsampler_steps!r}: not whole numbers") from None
        if min(numbers) < 1:
            raise GenerateError(f"--upsampler-steps {self.upsampler_steps!r}: steps must be >= 1")
        per = lambda v, i: v[0] if len(v) == 1 else v[i]  # noqa: E731
        return (
            [self.steps, *(per(numbers, i) for i in range(upsamplers))],
            [self.guidance, *(per(guidance, i) for i in range(upsamplers))],
        )

    def input_files(self) -> dict[str, str]:
        """flag -> path of every file the flags name."""
        names = [
            n for n in type(self).model_fields if n.endswith(("_from", "_map")) or n in ("mask", "source")
        ]
        return {flag(n): getattr(self, n) for n in names if getattr(self, n)}


def flag(key: str) -> str:
    """The flag of a config key: ``num_images`` -> ``--num-images``."""
    return "--" + key.replace("_", "-")


def load_generate_config(
    path: str | None, flags: Mapping[str, Any], overrides: Iterable[str] = ()
) -> GenerateConfig:
    """``load_config`` with the command's flags as values; a bad value a flag gave is reported
    under the flag's name (``--steps: …``), one from the file or ``--set`` under its key."""
    overrides = list(overrides)
    try:
        return load_config(GenerateConfig, path, flags, overrides)
    except ConfigError as e:
        given = {k for k, v in flags.items() if v is not None} - set(parse_overrides(overrides))
        # The checks of _check name their flags themselves; pydantic names the model instead.
        keys = "|".join([re.escape(k) for k in sorted(given)] + [GenerateConfig.__name__])
        message = re.sub(rf"(^|; )({keys}): ", lambda m: m.group(1) + _flag_of(m.group(2)), str(e))
        raise ConfigError(message) from None


def _flag_of(key: str) -> str:
    return "" if key == GenerateConfig.__name__ else flag(key) + ": "
