"""Composer's cascade (§3, as unCLIP and Imagen): a base model, then upsamplers, run one after the
other; each upsampler takes the previous stage's samples as its ``low_res`` input.

A **cascade directory** holds each stage as a saved ``ComposerPipeline`` and ``cascade.json``::

    cascade.json        {"format": "recompose.cascade/1", "stages": ["base", "upsampler-1", …],
                         "resolutions": [32, 64, …], "prior": "prior" or null}
    prior/              optional: a PriorPipeline, caption -> semantics embedding
    base/               the base model (model_index.json, unet/, scheduler/[, vae/ …])
    upsampler-1/        an upsampler whose input side is the base's output side
    …

``recompose cascade`` (``assemble``) writes one from trained exports; ``recompose generate`` /
``serve`` / ``evaluate`` load it (``Cascade.load``) and ``--resolution`` picks how far it runs.
Every stage is given its conditions at its own resolution (the caller decomposes them per
stage, ``ImageDecomposer.for_pipeline``), and a masked edit or a bidirectional inversion runs at
every stage: the last stage's source and mask are at the output resolution, so the pixels outside
the mask are the source's there, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserError

CASCADE_FILE = "cascade.json"
FORMAT = "recompose.cascade/1"


class CascadeError(UserError):
    """A cascade that cannot be assembled or loaded; the message says which stage and why."""


def is_cascade(path: str | Path) -> bool:
    return (Path(path) / CASCADE_FILE).is_file()


@dataclass
class StageInputs:
    """What one stage samples from, at that stage's resolution R (``ComposerPipeline.__call__``'s
    arguments): conditions, guidance, steps, and for an edit the source (R, R, 3) and mask (R, R),
    for bidirectional guidance the conditions to invert the source under."""

    conditions: dict[str, Any]
    guidance: Any = 3.0
    steps: int = 50
    source: np.ndarray | None = None
    mask: np.ndarray | None = None
    invert_conditions: dict[str, Any] | None = None
    invert_guidance: Any = 1.0
    level: int = 0  # upsamplers: the noise-augmentation level of their low_res input
    paint: dict[str, np.ndarray] | None = None  # paint-with-words: {phrase: (R, R) region}
    paint_weight: float = 1.0
    paint_caption: str | None = None  # the caption the phrases are in (frozen-embedding models)

    def request(self, num_images: int, seed: int, **changes: Any) -> Any:
        """This stage's ``SampleRequest`` (``changes`` replace its conditions or inversion)."""
        from pipelines.diffusion.requests import SampleRequest

        fields = dict(
            conditions=self.conditions,
            guidance=self.guidance,
            source=self.source,
            mask=self.mask,
            invert_conditions=self.invert_conditions,
            invert_guidance=self.invert_guidance,
            paint=self.paint,
            paint_weight=self.paint_weight,
            paint_caption=self.paint_caption,
        )
        return SampleRequest(num_images=num_images, seed=seed, **(fields | changes))


@dataclass
class StageOutput:
    resolution: int
    images: np.ndarray  # (N, R, R, 3) uint8
    guidance: dict  # Guidance.describe()
    threshold: str
    invert_guidance: dict | None
    seconds: float
    extra: dict = field(default_factory=dict)


class Cascade:
    """The loaded stages of a cascade directory, base first."""

    def __init__(self, stages: Sequence[Any], names: Sequence[str] | None = None, prior: Any = None):
        if not stages:
            raise CascadeError("a cascade needs at least its base stage")
        self.stages = list(stages)
        self.prior = prior  # a PriorPipeline (caption -> semantics embedding), or None
        self.names = list(names or ["base", *(f"upsampler-{i}" for i in range(1, len(stages)))])
        check_chain([_shape(p) for p in self.stages], self.names)

    @property
    def resolutions(self) -> list[int]:
        return [p.image_size for p in self.stages]

    @property
    def base(self) -> Any:
        return self.stages[0]

    def upto(self, resolution: int | None) -> list[Any]:
        """The stages that run to reach ``resolution`` (None: all of them)."""
        if resolution is None:
            return self.stages
        if resolution not in self.resolutions:
            raise CascadeError(
                f"--resolution {resolution}: this cascade makes {', '.join(map(str, self.resolutions))} px"
            )
        return self.stages[: self.resolutions.index(resolution) + 1]

    @classmethod
    def load(cls, path: str | Path, device: str) -> Cascade:
        """Every stage of the cascade directory ``path``, on ``device`` (float32)."""
        import torch

        from pipelines.diffusion.ensemble import EnsembleError, attach_experts
        from pipelines.diffusion.pipeline import ComposerPipeline

        root = Path(path)
        index = read_index(root)
        stages = []
        for name in index["stages"]:
            try:
                pipe = ComposerPipeline.from_pretrained(str(root / name), dtype=torch.float32)
            except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken save
                raise CascadeError(
                    f"{root}: stage {name} could not be loaded ({type(e).__name__}: {e})"
                ) from e
            try:
                stages.append(attach_experts(pipe.to(device), root / name))
            except EnsembleError as e:
                raise CascadeError(f"{root}: stage {name}: {e}") from None
        prior = None
        if index.get("prior"):
            from pipelines.diffusion.prior import PriorPipeline

            try:
                prior = PriorPipeline.from_pretrained(str(root / index["prior"]), dtype=torch.float32)
            except Exception as e:  # noqa: BLE001
                raise CascadeError(f"{root}: the prior could not be loaded ({type(e).__name__}: {e})") from e
            prior = prior.to(device)
            prior.set_progress_bar_config(disable=True)
        return cls(stages, index["stages"], prior)

    def sample_semantics(self, dec: Any, text: str, guidance: float, steps: int, seed: int) -> np.ndarray:
        """The prior's semantics embedding (D,) for ``text``, its caption inputs made by ``dec``
        (the base's ``ImageDecomposer``: text, or the CLIP/T5 embeddings the prior takes)."""
        if self.prior is None:
            raise CascadeError("this model has no prior: build the cascade with recompose cascade --prior")
        if self.prior.prior.config.caption_encoder == "trainable":
            captions: Any = [text]
        else:
            captions = {
                k: np.asarray(v)[None] for k, v in dec.caption(text).items() if k.startswith("caption.")
            }
        return self.prior(captions, guidance=guidance, num_inference_steps=steps, seed=seed)[0]

    def __call__(
        self,
        inputs: Sequence[StageInputs],
        num_images: int = 1,
        seed: int = 0,
        scheduler: str = "ddim",
        threshold: str | None = None,
        on_stage: Callable[[int, int], None] | None = None,
    ) -> list[StageOutput]:
        """Runs the first ``len(inputs)`` stages; one ``StageOutput`` per stage, the last one is
        the result. Stage 0 samples ``num_images`` from ``seed``; the upsamplers follow (``upsample``)."""
        import time

        if not 1 <= len(inputs) <= len(self.stages):
            raise ValueError(f"give inputs for 1..{len(self.stages)} stages, got {len(inputs)}")
        if on_stage is not None:
            on_stage(0, self.base.image_size)
        t, stage = time.perf_counter(), inputs[0]
        result = self.base.sample_batch([stage.request(num_images, seed)], stage.steps, scheduler, threshold)[
            0
        ]
        first = StageOutput(
            self.base.image_size,
            result.images,
            result.guidance,
            result.threshold,
            result.invert_guidance,
            time.perf_counter() - t,
        )
        step = None if on_stage is None else (lambda i, side: on_stage(i + 1, side))
        ups = upsample(
            self.stages[1 : len(inputs)], inputs[1:], first.images, seed, scheduler, threshold, step
        )
        return [first, *ups]


def upsample(
    upsamplers: Sequence[Any],
    inputs: Sequence[StageInputs],
    images: np.ndarray,
    seed: int = 0,
    scheduler: str = "ddim",
    threshold: str | None = None,
    on_stage: Callable[[int, int], None] | None = None,
) -> list[StageOutput]:
    """``images`` (N, r, r, 3) uint8 through ``upsamplers`` in turn, one ``StageOutput`` each: each
    sample j takes the previous stage's sample j as ``low_res`` (at its ``StageInputs.level``) and
    draws its noise from (seed, stage, j); all of a stage's samples are one batched run."""
    import time

    from pipelines.diffusion.inputs import downsample_image

    outputs: list[StageOutput] = []
    for i, (pipe, stage) in enumerate(zip(upsamplers, inputs, strict=True)):
        if on_stage is not None:
            on_stage(i, pipe.image_size)
        t = time.perf_counter()
        f = pipe.unet.config.upsample_factor
        invert = stage.invert_conditions
        if invert is not None:  # the source is inverted from its own low-resolution version
            source_low = downsample_image(np.asarray(stage.source, np.uint8)[None], f)[0]
            invert = {**invert, "low_res": source_low, "low_res.level": stage.level}
        requests = [
            stage.request(
                1,
                stage_seed(seed, i + 1, j),
                conditions={**stage.conditions, "low_res": low, "low_res.level": stage.level},
                invert_conditions=invert,
            )
            for j, low in enumerate(images)
        ]
        results = pipe.sample_batch(requests, stage.steps, scheduler, threshold)
        images = np.concatenate([r.images for r in results])
        first = results[0]
        outputs.append(
            StageOutput(
                pipe.image_size,
                images,
                first.guidance,
                first.threshold,
                first.invert_guidance,
                time.perf_counter() - t,
            )
        )
    return outputs


def resize_for_stage(name: str, value: np.ndarray, side: int) -> np.ndarray:
    """An input given at the output side, brought to a lower stage's ``side``: images and
    depth/intensity area-averaged, instance ids by nearest neighbour, a sketch's edges and a mask's
    regenerated region kept wherever any pixel they cover has them. Unchanged at its own side."""
    from PIL import Image

    a = np.asarray(value)
    if a.shape[0] == side:
        return a
    if name == "instances":
        return np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.NEAREST))
    if name in ("sketch", "mask"):
        top = 255 if name == "sketch" else 1
        box = np.asarray(
            Image.fromarray((a > 0).astype(np.uint8) * 255).resize((side, side), Image.Resampling.BOX)
        )
        return np.where(box > 0, top, 0).astype(np.uint8)
    return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((side, side), Image.Resampling.BOX))


def upscale_factors(upsamplers: Sequence[Any]) -> list[int]:
    """The overall factors the first 1, 2, … ``upsamplers`` make together (×2, ×4, …)."""
    import itertools
    import operator

    return list(itertools.accumulate((p.unet.config.upsample_factor for p in upsamplers), operator.mul))


def stage_seed(seed: int, stage: int, index: int) -> int:
    """The seed of an upsampler's sample ``index``: distinct per (seed, stage, index)."""
    return int(np.random.SeedSequence([seed, stage, index]).generate_state(1)[0])


# -- the directory ------------------------------------------------------------------------------
def read_index(root: Path) -> dict[str, Any]:
    """``cascade.json`` of ``root``, checked (format, every stage a saved pipeline)."""
    path = root / CASCADE_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CascadeError(f"{root}: not a cascade directory (no {CASCADE_FILE})") from None
    except ValueError as e:
        raise CascadeError(f"{path} is not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise CascadeError(f"{path}: format {index.get('format')!r}, this recompose reads {FORMAT!r}")
    stages = index.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise CascadeError(f"{path}: 'stages' must be a non-empty list of stage directories")
    for name in [*stages, *([index["prior"]] if index.get("prior") else [])]:
        if Path(name).name != name or not (root / name / "model_index.json").is_file():
            raise CascadeError(f"{path}: stage {name!r} is not a saved pipeline directory in {root}")
    return index


def _shape(pipe: Any) -> tuple[int, int]:
    return pipe.image_size, pipe.unet.config.upsample_factor


def check_chain(shapes: Sequence[tuple[int, int]], names: Sequence[str]) -> None:
    """Stage 0 is a base model (factor 1); each later stage an upsampler whose input side
    (side / factor) is the previous stage's side."""
    side, factor = shapes[0]
    if factor != 1:
        raise CascadeError(f"the first stage ({names[0]}) must be a base model, not an upsampler ×{factor}")
    for (r, f), name in zip(shapes[1:], names[1:], strict=True):
        if f == 1:
            raise CascadeError(f"stage {name} is a base model; every stage after the first is an upsampler")
        if r // f != side:
            raise CascadeError(
                f"stage {name} upsamples {r // f}→{r} px, but the stage before it makes {side} px"
            )
        side = r


def stage_shape(model_index: Path) -> tuple[int, int]:
    """(image side, upsample factor) of a saved pipeline, from its config files alone."""
    unet = json.loads((model_index.parent / "unet" / "config.json").read_text())
    local = int(unet.get("local_downsample", 1))
    return int(unet["sample_size"]) * local, int(unet.get("upsample_factor", 1))


def check_prior(prior_dir: Path, base_dir: Path, prior: str) -> None:
    """The prior makes the semantics embedding the base takes: same width, same kind (CLIP, or
    the base's trainable encoder)."""
    index = json.loads((prior_dir / "model_index.json").read_text())
    if index.get("_class_name") != "PriorPipeline":
        raise CascadeError(f"--prior {prior}: holds a {index.get('_class_name')}, not a PriorPipeline")
    p = json.loads((prior_dir / "prior" / "config.json").read_text())
    b = json.loads((base_dir / "unet" / "config.json").read_text())
    if p["embedding_dim"] != b.get("semantics_dim"):
        raise CascadeError(
            f"--prior {prior}: samples {p['embedding_dim']}-d semantics, the base takes {b.get('semantics_dim')}-d"
        )
    if bool(p.get("image_encoder_bottleneck")) != (b.get("semantics_encoder", "trainable") == "trainable"):
        raise CascadeError(
            f"--prior {prior}: learned another kind of semantics embedding than the base takes"
        )


def assemble(
    base: str,
    upsamplers: Sequence[str],
    output: str | Path,
    resolve: Callable[[str], Path],
    prior: str | None = None,
    resolve_prior: Callable[[str], Path] | None = None,
) -> dict[str, Any]:
    """Copies the pipelines ``base`` and ``upsamplers`` (directories or MLflow URIs, turned into
    directories by ``resolve``) and the ``prior`` into the cascade directory ``output``; returns
    its ``cascade.json``. The chain of resolutions (and the prior's embedding) is checked before
    anything is copied; ``output`` must not exist."""
    out = Path(output)
    if out.exists():
        raise CascadeError(f"--output {out} already exists; give a new directory")
    dirs = [resolve(m) for m in (base, *upsamplers)]
    names = ["base", *(f"upsampler-{i}" for i in range(1, len(dirs)))]
    shapes = [stage_shape(d / "model_index.json") for d in dirs]
    check_chain(shapes, [f"{n} ({m})" for n, m in zip(names, (base, *upsamplers), strict=True)])
    prior_dir = None
    if prior is not None:
        prior_dir = (resolve_prior or Path)(prior)
        if not (prior_dir / "model_index.json").is_file():
            raise CascadeError(f"--prior {prior}: not a saved prior (no model_index.json)")
        check_prior(prior_dir, dirs[0], prior)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for d, name in zip(dirs, names, strict=True):
        shutil.copytree(d, tmp / name)
    if prior_dir is not None:
        shutil.copytree(prior_dir, tmp / "prior")
    index = {
        "format": FORMAT,
        "stages": names,
        "resolutions": [r for r, _ in shapes],
        "prior": "prior" if prior_dir is not None else None,
        "from": dict(zip(names, (base, *upsamplers), strict=True)) | ({"prior": prior} if prior else {}),
    }
    (tmp / CASCADE_FILE).write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(out)
    return index


def describe(index: Mapping[str, Any]) -> str:
    chain = " → ".join(f"{n} {r}px" for n, r in zip(index["stages"], index["resolutions"], strict=True))
    return ("prior → " if index.get("prior") else "") + chain
