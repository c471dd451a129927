"""A pretrained Stable Diffusion–family pipeline directory as recompose's ``--base``.

``BASE`` is a diffusers-format pipeline directory (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), given as a local path or as a repo id already
in the local Hugging Face cache (looked up with ``local_files_only=True``, as under
``HF_HUB_OFFLINE=1``: nothing is ever downloaded). Its components serve three stages:

- decomposition: the VAE encodes images into the ``latents`` representation and the text
  encoder the caption (``caption.encoder: base``), so training never runs either;
- training: the UNet becomes the Composer UNet (``models/backbone.py``);
- the export: the VAE, text encoder and tokenizer travel with the ``ComposerPipeline``.

``vae_identity`` names a VAE by the SHA-256 of its weights and its scaling factor: latents from
one VAE are meaningless to a model trained on another's, and training refuses the mismatch.

Heavy libraries are imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import UserError

if TYPE_CHECKING:
    import torch

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The pipelines whose layout this takes: SD 1.x / 2.x (one CLIP text encoder).
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
# Named in messages: the Stable Diffusion 1.5 weights and the command that fetches them.
SUGGESTED_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class BaseModelError(UserError):
    """``--base`` cannot be used; the message names the directory and what is wrong."""


def resolve_base(spec: str) -> Path:
    """The local directory of the pipeline ``spec`` names (a path, or a cached repo id), checked
    to be an SD 1.x/2.x diffusers pipeline without loading any weights."""
    if os.path.isdir(spec):
        path = Path(spec)
    elif os.path.exists(spec):
        raise BaseModelError(f"--base {spec}: is a file; give a diffusers pipeline directory")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(spec, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - the hub raises several types for "not cached"
            raise BaseModelError(
                f"--base {spec}: neither a local directory nor a repo in the Hugging Face cache "
                f"({type(e).__name__}). Nothing is downloaded here: on a machine with internet run "
                f"`huggingface-cli download {spec if '/' in spec else SUGGESTED_BASE}` and copy the "
                "cache (or the snapshot directory) over"
            ) from None
    index = path / "model_index.json"
    if not index.is_file():
        raise BaseModelError(f"--base {spec}: no model_index.json; give a diffusers pipeline directory")
    try:
        meta = json.loads(index.read_text())
    except ValueError as e:
        raise BaseModelError(f"--base {spec}: model_index.json is not valid JSON ({e})") from None
    name = meta.get("_class_name")
    if name in ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        raise BaseModelError(
            f"--base {spec}: a {name}; recompose adapts Stable Diffusion 1.x / 2.x pipelines "
            "(one CLIP text encoder, UNet2DConditionModel) so far"
        )
    if name not in SUPPORTED:
        raise BaseModelError(f"--base {spec}: holds a {name}, expected one of {', '.join(SUPPORTED)}")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise BaseModelError(f"--base {spec}: lacks {', '.join(missing)}/")
    return path


def _weights(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BaseModelError(
            f"{directory}: no .safetensors weights (pickled .bin weights are never loaded; convert them "
            "with diffusers' save_pretrained(safe_serialization=True))"
        )
    return files


def vae_identity(base: str | Path) -> dict[str, Any]:
    """What makes two VAEs' latents interchangeable: the SHA-256 of the weights, the scaling
    factor, the latent channels and the spatial scale factor (read from the config only)."""
    path = resolve_base(str(base)) / "vae"
    config = json.loads((path / "config.json").read_text())
    return {
        "sha256": _digest(_weights(path)),
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
        "shift_factor": config.get("shift_factor"),
        "latent_channels": int(config.get("latent_channels", 4)),
        "scale_factor": 2 ** (len(config.get("block_out_channels", [0])) - 1),
    }


def text_encoder_identity(base: str | Path) -> dict[str, Any]:
    """What makes two bases' caption embeddings interchangeable: the SHA-256 of the text encoder's
    weights and of the tokenizer's files."""
    path = resolve_base(str(base))
    tokenizer = sorted(f for f in (path / "tokenizer").iterdir() if f.is_file())
    return {"sha256": _digest(_weights(path / "text_encoder")), "tokenizer_sha256": _digest(tokenizer)}


def _digest(files: list[Path]) -> str:
    """The SHA-256 of one file, or of the concatenated SHA-256s of several (in the given order)."""
    from pipelines.files import sha256_file

    digests = [sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


@dataclass
class BaseModel:
    """Loaded components of a base pipeline (only those asked for; the others None)."""

    path: Path
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_text`` with this base's tokenizer and text encoder."""
        return encode_text(self.tokenizer, self.text_encoder, texts)


def encode_text(tokenizer: Any, text_encoder: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (tokens (B, L, W) last hidden states, sentence (B, W) pooled output), as Stable
    Diffusion conditions on them (padded to the tokenizer's model_max_length); no gradients."""
    import torch

    ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    with torch.no_grad():
        out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


def load_base(
    base: str | Path,
    components: tuple[str, ...] = COMPONENTS,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> BaseModel:
    """The ``components`` of the base pipeline ``base`` (``resolve_base``), safetensors only,
    frozen and in eval mode, on ``device``."""
    import torch

    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown base components {sorted(unknown)}; known: {COMPONENTS}")
    path = resolve_base(str(base))
    dtype = dtype or torch.float32
    out = BaseModel(path=path)
    for name in components:
        if name not in ("tokenizer", "scheduler"):
            _weights(path / name)
        try:
            part = _load(name, str(path / name), dtype)
        except Exception as e:  # noqa: BLE001 - the libraries raise many types for a broken directory
            raise BaseModelError(f"--base {base}: could not load {name}/ ({type(e).__name__}: {e})") from e
        if isinstance(part, torch.nn.Module):
            part = part.to(device).eval().requires_grad_(False)
        setattr(out, name, part)
    return out


def _load(name: str, path: str, dtype: torch.dtype) -> Any:
    """One component from its directory. Each imports only its own library: a decomposition
    actor that runs only the VAE (or only the text encoder) starts seconds sooner."""
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    if name == "scheduler":
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_pretrained(path)
    from transformers import CLIPTextModel, CLIPTokenizer

    if name == "text_encoder":
        return CLIPTextModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return CLIPTokenizer.from_pretrained(path)
