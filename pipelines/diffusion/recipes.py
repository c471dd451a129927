"""Composer's tasks (§4, Figs. 1-7) as thin recipes: which conditions, from which image, which guidance.

Each recipe decomposes its input images with the pipeline's own extractors (``ImageDecomposer``),
picks the conditions the task recombines and calls ``ComposerPipeline``; ``**kwargs`` go to the
pipeline (``num_inference_steps``, ``num_images``, ``seed``, ``scheduler``, ...). Images are
(R, R, 3) uint8 arrays at the model's resolution (``ImageDecomposer.load_image`` reads files).

    variation            semantics (+ palette) of one image                      §4 "variations"
    interpolate          semantics / palette slerped between two images          §4 "interpolations"
    style_transfer       semantics + palette of a style image, layout of another  Fig. 3
    colorize             intensity of a grayscale image + a palette              Fig. 5
    translate            layout maps of an image + a new caption                 Fig. 4 "image translation"
    pose_transfer        appearance (semantics, palette) + another image's layout Fig. 6
    virtual_try_on       masked region of a person regenerated with a garment's semantics
    reconfigure          edited sketch/depth/instances map, bidirectional guidance Fig. 7
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipelines.data.decomposer import ImageDecomposer
from pipelines.diffusion.guidance import Guidance
from pipelines.diffusion.inputs import image_to_tensor
from pipelines.diffusion.pipeline import ComposerOutput, ComposerPipeline

LAYOUT = ("sketch", "depth", "instances")


def _decomposer(pipe: ComposerPipeline, decomposer: ImageDecomposer | None) -> ImageDecomposer:
    return decomposer or ImageDecomposer.for_pipeline(pipe)


def variation(
    pipe: ComposerPipeline,
    image: np.ndarray,
    conditions: Iterable[str] = ("semantics",),
    guidance: float = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """New images sharing ``image``'s ``conditions`` (semantics: same content and style, new layout)."""
    c = _decomposer(pipe, decomposer).decompose(image, conditions)
    return pipe(c, guidance=guidance, **kwargs)


def semantics_embedding(pipe: ComposerPipeline, image: np.ndarray, decomposer: ImageDecomposer | None = None):
    """The (D,) semantics embedding of ``image``: the trainable encoder's or CLIP's."""
    if pipe.unet.image_encoder is not None:
        with torch.no_grad():
            return pipe.unet.encode_semantics(image_to_tensor(image[None]))[0].float().cpu().numpy()
    return np.asarray(_decomposer(pipe, decomposer).semantics(image)["semantics"], np.float32)


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation of two embeddings (norm interpolated linearly); exact at 0 and 1."""
    if alpha == 0:
        return np.asarray(a, np.float32)
    if alpha == 1:
        return np.asarray(b, np.float32)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / max(na, 1e-8), b / max(nb, 1e-8)
    omega = np.arccos(np.clip(np.dot(ua, ub), -1, 1))
    if omega < 1e-4:
        u = (1 - alpha) * ua + alpha * ub
    else:
        u = (np.sin((1 - alpha) * omega) * ua + np.sin(alpha * omega) * ub) / np.sin(omega)
    return (u * ((1 - alpha) * na + alpha * nb)).astype(np.float32)


def interpolate(
    pipe: ComposerPipeline,
    image_a: np.ndarray,
    image_b: np.ndarray,
    alphas: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    with_palette: bool = True,
    guidance: float = 3.0,
    decomposer: ImageDecomposer | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> list[ComposerOutput]:
    """One output per alpha: semantics slerped (and palettes mixed) from a to b, same noise seed."""
    dec = _decomposer(pipe, decomposer)
    ea, eb = semantics_embedding(pipe, image_a, dec), semantics_embedding(pipe, image_b, dec)
    pa = pb = None
    if with_palette:
        pa, pb = (
            dec.decompose(image_a, ["palette"])["palette"],
            dec.decompose(image_b, ["palette"])["palette"],
        )
    outs = []
    for alpha in alphas:
        c: dict[str, Any] = {"semantics": slerp(ea, eb, alpha)}
        if with_palette:
            c["palette"] = ((1 - alpha) * pa.astype(np.float32) + alpha * pb.astype(np.float32)).astype(
                np.float32
            )
        outs.append(pipe(c, guidance=guidance, seed=seed, **kwargs))
    return outs


def style_transfer(
    pipe: ComposerPipeline,
    style_image: np.ndarray,
    content_image: np.ndarray,
    layout: Iterable[str] = ("sketch", "depth"),
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """The content image's layout maps drawn with the style image's semantics and palette."""
    dec = _decomposer(pipe, decomposer)
    c = {**dec.decompose(style_image, ["semantics", "palette"]), **dec.decompose(content_image, layout)}
    return pipe(c, guidance=guidance, **kwargs)


def colorize(
    pipe: ComposerPipeline,
    image: np.ndarray,
    palette: np.ndarray,
    text: str | None = None,
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """Palette colorization: ``image``'s intensity (grayscale) coloured with ``palette`` (156,)."""
    dec = _decomposer(pipe, decomposer)
    c = {**dec.decompose(image, ["intensity"]), "palette": np.asarray(palette, np.float32)}
    if text is not None:
        c.update(dec.caption(text))
    return pipe(c, guidance=guidance, **kwargs)


def translate(
    pipe: ComposerPipeline,
    image: np.ndarray,
    text: str,
    layout: Iterable[str] = ("sketch", "depth"),
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """Image translation: ``image``'s layout kept, its content described anew by ``text``."""
    dec = _decomposer(pipe, decomposer)
    c = {**dec.decompose(image, layout), **dec.caption(text)}
    return pipe(c, guidance=guidance, **kwargs)


def pose_transfer(
    pipe: ComposerPipeline,
    appearance_image: np.ndarray,
    pose_image: np.ndarray,
    pose: Iterable[str] = ("instances", "sketch"),
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """The subject of ``appearance_image`` in the pose (instance shapes, edges) of ``pose_image``."""
    dec = _decomposer(pipe, decomposer)
    c = {**dec.decompose(appearance_image, ["semantics", "palette"]), **dec.decompose(pose_image, pose)}
    return pipe(c, guidance=guidance, **kwargs)


def virtual_try_on(
    pipe: ComposerPipeline,
    person_image: np.ndarray,
    garment_image: np.ndarray,
    mask: np.ndarray,
    keep: Iterable[str] = ("sketch",),
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """The masked region (the garment's place on the person) regenerated with the garment's
    semantics and palette; the person's ``keep`` maps hold the shape, and every pixel outside
    ``mask`` stays the person's exactly."""
    dec = _decomposer(pipe, decomposer)
    c = {**dec.decompose(garment_image, ["semantics", "palette"]), **dec.decompose(person_image, keep)}
    return pipe(c, guidance=guidance, source=person_image, mask=mask, **kwargs)


def reconfigure(
    pipe: ComposerPipeline,
    image: np.ndarray,
    edited: Mapping[str, np.ndarray],
    keep: Iterable[str] = ("semantics", "palette"),
    text: str | None = None,
    guidance: float | str = 3.0,
    decomposer: ImageDecomposer | None = None,
    **kwargs: Any,
) -> ComposerOutput:
    """Bidirectional guidance (§3.2): invert ``image`` under its own maps, sample under ``edited``.

    ``edited``: maps (R, R) uint8 by name (``sketch``, ``depth``, ``instances``), e.g. the image's
    sketch with a stroke erased. c1 = the image's own maps + ``keep``; c2 = the edited maps + ``keep``.
    """
    bad = set(edited) - set(LAYOUT)
    if bad:
        raise ValueError(f"reconfigure edits layout maps ({', '.join(LAYOUT)}), not {sorted(bad)}")
    dec = _decomposer(pipe, decomposer)
    shared = dec.decompose(image, keep)
    if text is not None:
        shared.update(dec.caption(text))
    original = {**shared, **dec.decompose(image, edited)}
    target = {**shared, **{k: np.asarray(v, np.uint8) for k, v in edited.items()}}
    return pipe(target, guidance=guidance, source=image, invert_conditions=original, **kwargs)


__all__ = [
    "Guidance",
    "colorize",
    "interpolate",
    "pose_transfer",
    "reconfigure",
    "semantics_embedding",
    "slerp",
    "style_transfer",
    "translate",
    "variation",
    "virtual_try_on",
]
