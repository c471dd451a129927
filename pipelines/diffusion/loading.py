"""Loading a saved ``ComposerPipeline`` from a directory or an MLflow ``models:/`` / ``runs:/`` URI,
checked before any weights are read, onto the device asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.diffusion.cascade import Cascade
    from pipelines.diffusion.pipeline import ComposerPipeline

MODEL_URIS = ("models:/", "runs:/")  # --model values resolved through MLflow, not paths
# The model shipped inside the package (pipelines/diffusion/reference/README.md says how it was
# made): what generate, serve and evaluate use when no --model is given.
REFERENCE_MODEL = "recompose:reference"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


class ModelError(UserError):
    """The model a command was given cannot be used; the message names it and why."""


def resolve_device(device: Literal["auto", "cpu", "cuda"]) -> str:
    """``auto``: CUDA when there is a device; asking for CUDA without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available")
    return device


def reference_dir() -> Path | None:
    """The shipped reference model's directory; None when this installation has none."""
    return REFERENCE_DIR if (REFERENCE_DIR / "model_index.json").is_file() else None


def model_path(model_dir: str) -> Path:
    """The local directory that ``model_dir`` names — a directory, an MLflow ``models:/<name>/<version>``,
    ``models:/<name>@<alias>`` or ``runs:/<run id>/<path>`` URI (``pipelines/diffusion/mlflow_model.py``;
    downloaded once, then cached), or ``REFERENCE_MODEL``: the reference model shipped with
    recompose — checked to exist; ``ModelError`` otherwise."""
    if model_dir == REFERENCE_MODEL:
        p = reference_dir()
        if p is None:
            raise ModelError(
                f"--model {REFERENCE_MODEL}: this installation has no reference model "
                f"({REFERENCE_DIR} is missing); give --model a trained pipeline directory"
            )
    elif model_dir.startswith(MODEL_URIS):
        from pipelines.diffusion.mlflow_model import resolve_model  # imports MLflow: only when a URI is given

        try:
            p = resolve_model(model_dir)
        except ValueError as e:  # the message starts with the URI
            raise ModelError(f"--model {e}") from None
    else:
        p = Path(model_dir)
    if not p.is_dir():
        raise ModelError(f"--model {model_dir}: no such directory")
    return p


def pipeline_dir(model_dir: str) -> Path:
    """The directory of the saved ``ComposerPipeline`` that ``model_dir`` names (``model_path``),
    checked without loading any weights; ``ModelError`` saying what is wrong otherwise."""
    from pipelines.diffusion.cascade import CASCADE_FILE
    from pipelines.diffusion.pipeline import ComposerPipeline

    p = model_path(model_dir)
    index = p / "model_index.json"
    if not index.is_file():
        if (p / CASCADE_FILE).is_file():
            raise ModelError(f"--model {model_dir}: is a cascade directory; this needs one saved pipeline")
        raise ModelError(
            f"--model {model_dir}: not a saved pipeline (no model_index.json); give the directory "
            "ComposerPipeline.save_pretrained wrote"
        )
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except ValueError as e:
        raise ModelError(f"--model {model_dir}: model_index.json is not valid JSON ({e})") from None
    if name != ComposerPipeline.__name__:
        raise ModelError(f"--model {model_dir}: holds a {name}, not a ComposerPipeline")
    return p


def check_model(model_dir: str, resolution: int | None = None) -> list[int]:
    """``model_dir`` checked without loading weights — a saved pipeline, or a cascade directory
    whose stages are all saved pipelines — and the sides of the stages that run up to
    ``resolution`` (None: all); ``ModelError`` saying what is wrong."""
    from pipelines.diffusion.cascade import CascadeError, is_cascade, read_index, stage_shape

    p = model_path(model_dir)
    if is_cascade(p):
        try:
            sides = list(read_index(p)["resolutions"])
        except CascadeError as e:
            raise ModelError(f"--model {model_dir}: {e}") from None
    else:
        side, factor = stage_shape(pipeline_dir(model_dir) / "model_index.json")
        if factor > 1:
            raise ModelError(
                f"--model {model_dir}: is an upsampler (×{factor}); it upsamples a given image "
                "(recompose upscale) or runs after a base in a cascade (recompose cascade)"
            )
        sides = [side]
    if resolution is not None:
        if resolution not in sides:
            raise ModelError(
                f"--resolution {resolution}: --model {model_dir} makes {', '.join(map(str, sides))} px"
            )
        sides = sides[: sides.index(resolution) + 1]
    return sides


def load_cascade(model_dir: str, device: str) -> Cascade:
    """``model_dir`` as a ``Cascade``: a cascade directory's stages, or a saved pipeline as a
    one-stage cascade; ``ModelError`` for an upsampler alone (it needs its low-resolution input:
    ``recompose upscale``, or a cascade with a base)."""
    from pipelines.diffusion.cascade import Cascade, CascadeError, is_cascade

    p = model_path(model_dir)
    try:
        if is_cascade(p):
            return Cascade.load(p, device)
        pipe = load_pipeline(model_dir, device)
        if pipe.unet.config.upsample_factor > 1:
            raise ModelError(
                f"--model {model_dir}: is an upsampler (×{pipe.unet.config.upsample_factor}); it upsamples "
                "a given image (recompose upscale) or runs after a base in a cascade (recompose cascade)"
            )
        return Cascade([pipe])
    except CascadeError as e:
        raise ModelError(f"--model {model_dir}: {e}") from None


def load_pipeline(model_dir: str, device: str) -> ComposerPipeline:
    """The saved ``ComposerPipeline`` that ``model_dir`` names (``pipeline_dir``), on ``device``."""
    import torch

    from pipelines.diffusion.ensemble import EnsembleError, attach_experts
    from pipelines.diffusion.pipeline import ComposerPipeline

    p = pipeline_dir(model_dir)
    try:
        # float32 whatever the weights were saved in (the reference model ships float16): sampling
        # is then the same computation on every machine, and CPUs have no fast float16 kernels.
        pipe = ComposerPipeline.from_pretrained(str(p), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken save
        raise ModelError(f"--model {model_dir}: could not load the pipeline ({type(e).__name__}: {e})") from e
    try:  # an ensemble directory: the experts beside the pipeline's own UNet
        return attach_experts(pipe.to(device), p)
    except EnsembleError as e:
        raise ModelError(f"--model {model_dir}: {e}") from None


def model_label(model_dir: str) -> tuple[str, str]:
    """(name, version) of the model (or cascade) ``model_dir`` names, to show to API callers instead of a
    filesystem path: the registered name and version of a ``models:/`` URI, the reference model's
    name, or a directory's last two parts (``train/export``); the version is the first 12 hex
    digits of the SHA-256 of the UNet's weight files (a ``models:/`` version keeps its number).
    """
    import hashlib

    from pipelines.files import sha256_file

    if model_dir.startswith("models:/"):
        name, _, version = model_dir.removeprefix("models:/").rstrip("/").partition("/")
        if not version and "@" in name:
            name, _, alias = name.partition("@")
            version = f"@{alias}"
        return name, version
    if model_dir.startswith("runs:/"):
        _, _, path = model_dir.removeprefix("runs:/").partition("/")
        name = path.strip("/") or "model"
    elif model_dir == REFERENCE_MODEL:
        name = REFERENCE_MODEL
    else:
        parts = Path(model_dir).resolve().parts
        name = "/".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else model_dir)
    from pipelines.diffusion.cascade import is_cascade, read_index

    root = model_path(model_dir)
    if is_cascade(root):  # every stage's UNet weights, in stage order
        weights = [
            w for s in read_index(root)["stages"] for w in sorted((root / s / "unet").glob("*.safetensors"))
        ]
    else:
        from pipelines.diffusion.ensemble import is_ensemble
        from pipelines.diffusion.ensemble import read_index as read_experts

        p = pipeline_dir(model_dir)
        unets = [e["unet"] for e in read_experts(p)["experts"]] if is_ensemble(p) else ["unet"]
        weights = [w for u in unets for w in sorted((p / u).glob("*.safetensors"))]
    if not weights:
        return name, "unknown"
    if len(weights) == 1:
        return name, sha256_file(weights[0])[:12]
    combined = "".join(sha256_file(f) for f in weights)  # sharded weights: one digest of the shards'
    return name, hashlib.sha256(combined.encode()).hexdigest()[:12]
