"""Decompose one user image on the fly, exactly as the decomposition job decomposes its inputs.

Generation takes conditions "from an image" (``recompose generate --sketch-from IMG``, Composer
§3.1 and §4: any representation of a reference image can be recombined). The image is decoded
with the job's decoder (``decode_image``: EXIF orientation, alpha on white, shorter side to the
resolution, centre crop) and run through the same extractor classes with the same settings the
training shards were made with — the ``decompose`` entry of the pipeline's ``model_index.json``
(sections of ``DecomposeConfig`` as ``to_dict(cfg, outputs_only=True)`` writes them; missing
sections are the defaults) — so the model is conditioned on what it was trained on.

The result is the pipeline's condition inputs (``pipelines/diffusion/inputs.py``) for one image,
without the batch axis, e.g. ``{"sketch": (R, R) uint8}``. An extractor that cannot run (depth
with no weights, CLIP embeddings with no CLIP checkpoint) raises ``ExtractorUnavailable`` with its
reason; nothing silently falls back to something else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipelines.conditions import EXTRACTED_NAMES, MAPS, Extractor, ExtractorUnavailable, get_extractor
from pipelines.conditions.caption import CaptionConfig
from pipelines.conditions.depth import DepthConfig
from pipelines.conditions.instances import InstancesConfig
from pipelines.conditions.intensity import IntensityConfig
from pipelines.conditions.palette import PaletteConfig
from pipelines.conditions.semantics import SemanticsConfig
from pipelines.conditions.sketch import SketchConfig
from pipelines.config import Config, ConfigError, from_dict, nested
from pipelines.data.decode import (
    DecodeConfig,
    ImageTooLarge,
    decode_image,
    decode_rgb,
    open_image,
    resize_center_crop,
)
from pipelines.errors import UserError

# "base": a model on a pretrained base, whose pipeline encodes the caption text itself
CaptionEncoder = Literal["trainable", "clip", "t5", "clip+t5", "base"]
SemanticsEncoder = Literal["trainable", "clip"]
Device = Literal["auto", "cpu", "cuda"]


class ExtractionSettings(Config):
    """What decides a condition's value for an image: the stored resolution, the decoder and every
    extractor's settings. The decomposition job's config extends it with where to read and write;
    a pipeline records it (``model_index.json``'s ``decompose``) so generation decomposes a user
    image exactly as its training shards were made."""

    resolution: int = Field(64, ge=8)  # stored side length; Composer's base model works at 64×64
    decode: DecodeConfig = nested(DecodeConfig)
    caption: CaptionConfig = nested(CaptionConfig)
    semantics: SemanticsConfig = nested(SemanticsConfig)
    palette: PaletteConfig = nested(PaletteConfig)
    sketch: SketchConfig = nested(SketchConfig)
    instances: InstancesConfig = nested(InstancesConfig)
    depth: DepthConfig = nested(DepthConfig)
    intensity: IntensityConfig = nested(IntensityConfig)


class ImageReadError(UserError):
    """An image or map file could not be read; the message names the file."""


class ImageDecomposer:
    """One image -> condition inputs, with the decomposition job's extractors and settings.

    ``settings``: the decomposition config's sections (possibly partial or empty);
    ``resolution``: the model's map size (``pipe.image_size``), which replaces the settings' own;
    ``caption_encoder`` / ``semantics_encoder``: the model's (``model.config``), deciding whether the
    caption text / the image itself or their frozen CLIP/T5 embeddings are the inputs;
    ``device``: run the extractors' networks there (None: as the settings say, i.e. the CPU).
    """

    def __init__(
        self,
        settings: Mapping[str, Any] | None,
        resolution: int,
        caption_encoder: CaptionEncoder = "trainable",
        semantics_encoder: SemanticsEncoder = "trainable",
        device: Device | None = None,
    ):
        # The model decides the map size; the shards' resolution may differ (training resizes).
        # The job-level keys of a decomposition config (input, shard_size, …) do not change a value.
        known = ExtractionSettings.model_fields
        data = {k: v for k, v in dict(settings or {}).items() if k in known} | {"resolution": resolution}
        try:
            self.config = from_dict(ExtractionSettings, data)
        except ConfigError as e:
            raise ConfigError(f"the pipeline's decompose settings (model_index.json): {e}") from None
        if caption_encoder not in ("trainable", "clip", "t5", "clip+t5", "base"):
            raise ValueError(
                f"caption_encoder must be trainable, clip, t5, clip+t5 or base, got {caption_encoder!r}"
            )
        if semantics_encoder not in ("trainable", "clip"):
            raise ValueError(f"semantics_encoder must be trainable or clip, got {semantics_encoder!r}")
        self.resolution = resolution
        self.caption_encoder = caption_encoder
        self.semantics_encoder = semantics_encoder
        self.device = device
        self._extractors: dict[str, Extractor] = {}

    @classmethod
    def for_pipeline(cls, pipe: Any, device: Device | None = None) -> ImageDecomposer:
        """The decomposer matching a ``ComposerPipeline``: its settings, map size and encoders."""
        cfg = pipe.unet.config
        return cls(pipe.config.decompose, pipe.image_size, cfg.caption_encoder, cfg.semantics_encoder, device)

    # -- files -----------------------------------------------------------------------------------
    def load_image(self, path: str | Path | bytes) -> np.ndarray:
        """An image file -> (R, R, 3) uint8 RGB, decoded as the decomposition job decodes."""
        try:
            return decode_image(read_bytes(path), self.resolution, self.config.decode)
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file here
            raise _decode_error(path, "image", e) from e

    def load_image_as_is(self, path: str | Path | bytes) -> np.ndarray:
        """An image file -> (H, W, 3) uint8 RGB at its own size (``load_image`` without the
        resize and crop): what outpainting places on its canvas."""
        try:
            return np.asarray(decode_rgb(read_bytes(path), self.config.decode))
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file here
            raise _decode_error(path, "image", e) from e

    def _open(self, data: bytes):
        """The decode settings' ``open_image`` with their ``max_pixels`` checked from the header."""
        im = open_image(data, self.config.decode.formats)
        w, h = im.size
        if w * h > self.config.decode.max_pixels:
            raise ImageTooLarge(
                f"{w}x{h} = {w * h} pixels exceeds max_pixels={self.config.decode.max_pixels}"
            )
        return im

    def load_map(self, name: str, path: str | Path | bytes) -> np.ndarray:
        """An already-made map picture (e.g. an edited ``conditions/sketch.png``) -> (R, R) uint8.

        ``sketch``, ``depth``, ``intensity``: a grayscale picture (colour ones are converted with
        BT.601 luma, as ``intensity``), resized and centre-cropped like an image. ``instances``: an
        ids PNG (mode L, used as is) or a colourised picture (each colour one instance, black the
        background, numbered with the extractor's convention); nearest-neighbour, never blended.
        """
        if name not in MAPS:
            raise ValueError(f"load_map: {name!r} is not a map; maps: {', '.join(MAPS)}")
        if name == "instances":
            return self._load_instances(read_bytes(path), path)
        import cv2

        rgb = self.load_image(path)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)

    def load_mask(self, path: str | Path | bytes) -> np.ndarray:
        """A mask picture (white = regenerate) -> (R, R) uint8 {0, 1}, 1 = regenerate.

        Framed as the image it edits is decoded (shorter side to R, centre crop; area resampling),
        then thresholded at mid-gray by ``mask_from_image``, so a mask drawn over the full-size
        source lines up with the decoded source whatever its aspect ratio.
        """

        from PIL import Image, ImageOps

        from pipelines.conditions.mask import mask_from_image

        try:
            im = ImageOps.exif_transpose(self._open(read_bytes(path)))
            gray = resize_center_crop(im.convert("L"), self.resolution, Image.Resampling.BOX)
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file here
            raise _decode_error(path, "mask", e) from e
        return mask_from_image(gray, self.resolution)

    def _load_instances(self, data: bytes, path: str | Path | bytes) -> np.ndarray:
        from PIL import Image

        from pipelines.conditions.instances import renumber

        try:
            im = self._open(data)
            im.load()
        except Exception as e:  # noqa: BLE001
            raise _decode_error(path, "instances map", e) from e
        if im.mode in ("L", "I", "I;16", "I;16L", "I;16B"):
            ids = np.asarray(im)
            if ids.max(initial=0) > 255:
                raise ImageReadError(f"{_name(path)}: instance ids must be 0..255, found {int(ids.max())}")
            im = Image.fromarray(ids.astype(np.uint8), "L")
            return resize_center_crop(im, self.resolution, Image.Resampling.NEAREST)
        rgb = resize_center_crop(im.convert("RGB"), self.resolution, Image.Resampling.NEAREST)
        packed = rgb.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        return renumber(packed, self.config.instances.max_instances)  # black (0) is the background

    # -- extraction ------------------------------------------------------------------------------
    def extractor(self, name: str) -> Extractor:
        """The ready extractor ``name`` (built and loaded once); raises ``ExtractorUnavailable``."""
        if name not in self._extractors:
            cls = get_extractor(name)
            section = getattr(self.config, name)
            if name == "caption":  # only the encoder this model takes
                section = section.model_copy(update={"encoders": tuple(self.caption_encoder.split("+"))})
            if self.device is not None:
                section = section.model_copy(update={"device": self.device})
            ext = cls(section, self.resolution, has_ground_truth=False)
            try:
                ext.prepare()
            except ExtractorUnavailable as e:
                raise ExtractorUnavailable(
                    f"{name} cannot be decomposed with this pipeline's settings "
                    f"(model_index.json: decompose.{name}): {e}"
                ) from e
            self._extractors[name] = ext
        return self._extractors[name]

    def unavailable_reason(self, name: str) -> str | None:
        """Why ``name`` cannot be taken from a user image with these settings, or None; the
        extractor's own check, without loading any weights (``extractor`` loads them)."""
        cls = get_extractor(name)
        return cls(getattr(self.config, name), self.resolution, has_ground_truth=False).unavailable_reason()

    def _run(self, name: str, image: np.ndarray | None, text: str = "") -> dict[str, np.ndarray]:
        """One extractor on a batch of one (the batch contract of ``conditions/base.py``)."""
        r = self.resolution
        if image is None:
            image = np.zeros((r, r, 3), np.uint8)  # the caption extractor reads only the text
        if image.shape != (r, r, 3) or image.dtype != np.uint8:
            raise ValueError(f"expected a ({r}, {r}, 3) uint8 image, got {image.dtype}{image.shape}")
        batch = {
            "image": image[None].copy(),  # writable, as torch.from_numpy wants
            "text": np.array([text], dtype=object),
            "has_gt": np.zeros(1, bool),  # a user image never carries ground truth
        }
        return {k: v[0] for k, v in self.extractor(name)(batch).items()}

    def caption(self, text: str) -> dict[str, Any]:
        """The caption inputs: the text itself (a trainable encoder, or a base model's pipeline
        text encoder), or its frozen CLIP/T5 embeddings."""
        if self.caption_encoder in ("trainable", "base"):
            return {"text": str(text)}
        return self._run("caption", None, str(text))

    def semantics(self, image: np.ndarray) -> dict[str, Any]:
        """The semantics inputs: the image (trainable encoder) or its CLIP image embedding."""
        if self.semantics_encoder == "trainable":
            return {"semantics.image": np.asarray(image, np.uint8)}
        return self._run("semantics", image)

    def decompose(
        self, image: np.ndarray | None, names: Iterable[str], text: str | None = None
    ) -> dict[str, Any]:
        """``names`` of ``image`` (and ``text`` for the caption) -> the model's condition inputs."""
        out: dict[str, Any] = {}
        for name in names:
            if name not in EXTRACTED_NAMES:  # `mask` is drawn by the user, never decomposed
                raise ValueError(
                    f"cannot decompose {name!r}; decomposed conditions: {', '.join(EXTRACTED_NAMES)}"
                )
            if name == "caption":
                if text is None:
                    raise ValueError("the caption condition needs a text")
                out.update(self.caption(text))
                continue
            if image is None:
                raise ValueError(f"the {name} condition needs an image")
            out.update(self.semantics(image) if name == "semantics" else self._run(name, image))
        return out


def read_bytes(path: str | Path | bytes) -> bytes:
    """The file's bytes (``bytes`` are an upload, returned as they are); ``ImageReadError``
    naming the file when there is no such file."""
    if isinstance(path, (bytes, bytearray)):
        return bytes(path)
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    return p.read_bytes()


def _name(path: str | Path | bytes) -> str:
    return "the upload" if isinstance(path, (bytes, bytearray)) else str(path)


def _decode_error(path: str | Path | bytes, what: str, e: Exception) -> ImageReadError:
    from PIL import UnidentifiedImageError

    path = _name(path)
    if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO, not the file
        return ImageReadError(f"{path}: cannot decode the {what}: not an image format Pillow reads")
    return ImageReadError(f"{path}: cannot decode the {what} ({type(e).__name__}: {e})")
