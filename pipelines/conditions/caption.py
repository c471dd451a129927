"""``caption``: sentence and token embeddings of the caption text, Composer §3.1.

Composer embeds the caption with CLIP's text tower, both as one sentence vector (a global
condition) and as per-token states (cross-attention context). eDiffi and Imagen show that a T5
encoder's token states help text fidelity, so T5 can be stored next to (or instead of) CLIP; and a
model on a pretrained Stable Diffusion base (``--base``) conditions on the base's own text encoder:

    caption.clip_sentence (D,)                  the pooled, projected open_clip text embedding
    caption.clip_tokens   (L, W)                final hidden states (after ln_final, before the
                                                projection); L = context length, W = text width
    caption.t5_sentence   (D_t5,)               attention-mask-weighted mean of the token states
    caption.t5_tokens     (t5_max_length, D_t5) T5 encoder states, padding positions zeroed
    caption.base_sentence (W_b,)                the base text encoder's pooled output
    caption.base_tokens   (L_b, W_b)            its last hidden states, the caption padded to the
                                                tokenizer's model_max_length (L_b; 77 for SD)

All float16; an empty caption gets the empty prompt's embeddings. The ``base_*`` columns are
exactly ``BaseModel.encode_text`` (what Stable Diffusion's cross-attention reads), computed in
float32. Weights come from disk only: ``clip_model`` as in ``semantics`` (``local-dir:/path`` or
``hf-hub:org/repo`` from the local cache), ``t5_model`` a directory holding a ``T5EncoderModel``
checkpoint and its tokenizer, or a repo id already in the Hugging Face cache, ``base`` a diffusers
pipeline directory or cached repo (``pipelines/conditions/backbone.py``).

With no weights configured the extractor is unavailable, and that is not a dead end: the
decomposition job stores the caption text itself in the ``text`` column, and the trainable text
encoder of the embedded default configuration learns from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.conditions.backbone import BaseModelError, load_base, resolve_base, text_encoder_identity
from pipelines.conditions.base import (
    Batch,
    ColumnSpec,
    Extractor,
    ExtractorConfig,
    ExtractorUnavailable,
    resolve_weights,
)
from pipelines.conditions.semantics import (
    HF_HUB,
    LOCAL_DIR,
    check_open_clip_spec,
    no_clip_model_reason,
    open_clip_model_cfg,
    resolve_open_clip,
)
from pipelines.config import added, resource, to_dict

ENCODERS = ("clip", "t5", "base")
# The T5 that eDiffi and DeepFloyd IF use; only named in messages.
SUGGESTED_T5 = "google/t5-v1_1-xxl"


class CaptionConfig(ExtractorConfig):
    # Composer uses CLIP; add "t5" as eDiffi does; "base": the --base pipeline's text encoder
    encoders: tuple[Literal["clip", "t5", "base"], ...] = ("clip",)
    clip_model: str | None = None  # open_clip weights, 'local-dir:/path' or 'hf-hub:org/repo' (cache only)
    t5_model: str | None = None  # T5 encoder + tokenizer directory, or a repo id in the HF cache
    t5_max_length: int = Field(
        77, ge=1
    )  # T5 tokens kept per caption; 77 matches CLIP's context for equal cost
    batch_size: int = resource(64, ge=1)  # text encoders are cheap per row; 64 keeps a T5-XXL batch in memory
    base: str | None = added(None)  # the pipeline whose text encoder "base" runs; set from the job's `base`

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        if not self.encoders:
            raise ValueError(f"caption.encoders is empty; choose one or more of {list(ENCODERS)}")
        if len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"caption.encoders names an encoder twice: {list(self.encoders)}")
        check_open_clip_spec(self.clip_model, "caption.clip_model")
        if self.t5_model is not None and self.t5_model.startswith((LOCAL_DIR, HF_HUB)):
            raise ValueError(
                f"caption.t5_model takes a directory or a repo id (as transformers' from_pretrained), "
                f"without open_clip's prefix; got {self.t5_model!r}"
            )
        return self


def _resolve_t5(spec: str) -> str:
    """The local directory holding the T5 checkpoint ``spec``; never downloads."""
    path = resolve_weights(os.path.expanduser(spec), "caption.t5_model")
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ExtractorUnavailable(
            f"caption.t5_model: {path!r} has no config.json; expected a transformers T5 checkpoint"
        )
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise ExtractorUnavailable(f"caption.t5_model: {path!r} holds config.json but no weights file")
    return path


class CaptionExtractor(Extractor):
    """CLIP and/or T5 embeddings of ``batch["text"]``; see the module docstring for the columns."""

    name = "caption"
    version = "1"
    config_cls = CaptionConfig
    config: CaptionConfig

    def __init__(self, config: CaptionConfig, resolution: int, has_ground_truth: bool = False):
        super().__init__(config, resolution, has_ground_truth)
        self._dirs: dict[str, str] = {}
        self._schema: list[ColumnSpec] | None = None
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._device: Any = None
        self._base_identity: dict[str, Any] | None = None

    def _dir(self, encoder: str) -> str:
        """The resolved weights directory of ``encoder``; ``ExtractorUnavailable`` says why not."""
        if encoder not in self._dirs:
            c = self.config
            if encoder == "clip":
                if c.clip_model is None:
                    raise ExtractorUnavailable(no_clip_model_reason("caption.clip_model"))
                self._dirs[encoder] = resolve_open_clip(c.clip_model, "caption.clip_model")
            elif encoder == "base":
                if c.base is None:
                    raise ExtractorUnavailable(
                        "caption.encoders has 'base' and no base is given; give --base BASE_DIR "
                        "(config: base), a diffusers Stable Diffusion pipeline directory"
                    )
                try:
                    self._dirs[encoder] = str(resolve_base(c.base))
                except BaseModelError as e:
                    raise ExtractorUnavailable(str(e)) from None
            else:
                if c.t5_model is None:
                    raise ExtractorUnavailable(
                        f"no T5 weights configured; set caption.t5_model to a directory holding a T5 "
                        f"encoder checkpoint and tokenizer, or a repo id in the local Hugging Face cache "
                        f"(or drop 't5' from caption.encoders). Nothing is downloaded here: on a machine "
                        f"with internet run `huggingface-cli download {SUGGESTED_T5}` and copy the cache over"
                    )
                self._dirs[encoder] = _resolve_t5(c.t5_model)
        return self._dirs[encoder]

    def unavailable_reason(self) -> str | None:
        try:
            for encoder in self.config.encoders:
                self._dir(encoder)
                if (
                    encoder == "clip"
                    and "hf_model_name" in open_clip_model_cfg(self._dir("clip"))["text_cfg"]
                ):
                    # HFTextEncoder exposes no per-token states through forward_intermediates.
                    return "caption.clip_model has a Hugging Face text tower (hf_model_name), which is not supported"
        except ExtractorUnavailable as e:
            return str(e)
        return None

    def columns(self) -> list[ColumnSpec]:
        if self._schema is None:
            specs = []
            if "clip" in self.config.encoders:
                cfg = open_clip_model_cfg(self._dir("clip"))
                text = cfg["text_cfg"]
                width, length = int(text["width"]), int(text.get("context_length", 77))
                dim = width if text.get("proj_type") == "none" else int(cfg["embed_dim"])
                specs += [
                    ColumnSpec(
                        "caption.clip_sentence", "float16", (dim,), "pooled, projected CLIP text embedding"
                    ),
                    ColumnSpec(
                        "caption.clip_tokens", "float16", (length, width), "CLIP text final hidden states"
                    ),
                ]
            if "t5" in self.config.encoders:
                with open(Path(self._dir("t5")) / "config.json", encoding="utf-8") as f:
                    d_model = int(json.load(f)["d_model"])
                n = self.config.t5_max_length
                specs += [
                    ColumnSpec(
                        "caption.t5_sentence", "float16", (d_model,), "masked mean of T5 encoder states"
                    ),
                    ColumnSpec(
                        "caption.t5_tokens", "float16", (n, d_model), "T5 encoder states, padding zeroed"
                    ),
                ]
            if "base" in self.config.encoders:
                root = Path(self._dir("base"))
                width = int(json.loads((root / "text_encoder" / "config.json").read_text())["hidden_size"])
                tokenizer = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
                length = int(tokenizer["model_max_length"])
                specs += [
                    ColumnSpec(
                        "caption.base_sentence", "float16", (width,), "base text encoder pooled output"
                    ),
                    ColumnSpec(
                        "caption.base_tokens",
                        "float16",
                        (length, width),
                        "base text encoder last hidden states, padded to the tokenizer's model_max_length",
                    ),
                ]
            self._schema = specs
        return self._schema

    def fingerprint(self) -> str:
        # The base's text encoder is named by its weights, not by where they are (as latents' VAE).
        settings = {k: v for k, v in to_dict(self.config, outputs_only=True).items() if k != "base"}
        if "base" in self.config.encoders:
            settings["text_encoder"] = self._text_encoder()
        return self._fingerprint(settings)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if "base" in self.config.encoders:
            out |= {"base": self.config.base, "text_encoder": self._text_encoder()}
        return out

    def _text_encoder(self) -> dict[str, Any]:
        """``text_encoder_identity`` of the base (hashes the weights once per extractor)."""
        if self._base_identity is None:
            self._base_identity = text_encoder_identity(self._dir("base"))
        return self._base_identity

    def uses_model(self) -> bool:
        return True

    def setup(self) -> None:
        import torch

        self._device = torch.device(self.torch_device())
        if "clip" in self.config.encoders:
            import open_clip

            name = f"{LOCAL_DIR}{self._dir('clip')}"
            model = open_clip.create_model(name, device=self._device, require_pretrained=True)
            model.visual = None  # only the text tower runs here; free the image tower's memory
            self._models["clip"] = model.eval()
            self._tokenizers["clip"] = open_clip.get_tokenizer(name)
        if "t5" in self.config.encoders:
            from transformers import AutoTokenizer, T5EncoderModel

            path = self._dir("t5")
            self._tokenizers["t5"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
            # float32: T5 v1.1 overflows in float16, and checkpoints are stored in mixed dtypes.
            model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            self._models["t5"] = model.to(self._device).eval()
        if "base" in self.config.encoders:
            # float32: text is cheap per row, and the stored float16 then equals encode_text's output
            self._models["base"] = load_base(
                self._dir("base"), ("text_encoder", "tokenizer"), torch.float32, str(self._device)
            )

    def extract(self, batch: Batch) -> Batch:
        import torch

        texts = [str(t) for t in batch["text"]]
        out: Batch = {}
        with torch.no_grad():
            if "clip" in self.config.encoders:
                ids = self._tokenizers["clip"](texts).to(self._device)
                # One forward gives both: the last block's output through ln_final (the token
                # states) and the pooled, projected sentence embedding.
                res = self._models["clip"].forward_intermediates(
                    text=ids, text_indices=1, normalize_intermediates=True, normalize=False
                )
                out["caption.clip_sentence"] = _f16(res["text_features"])
                out["caption.clip_tokens"] = _f16(res["text_intermediates"][-1])
            if "t5" in self.config.encoders:
                enc = self._tokenizers["t5"](
                    texts,
                    padding="max_length",  # a fixed length keeps batches and single rows identical
                    max_length=self.config.t5_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).to(self._device)
                states = self._models["t5"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                mask = enc["attention_mask"].unsqueeze(-1).float()
                tokens = states.last_hidden_state.float() * mask
                out["caption.t5_sentence"] = _f16(tokens.sum(1) / mask.sum(1).clamp(min=1.0))
                out["caption.t5_tokens"] = _f16(tokens)
            if "base" in self.config.encoders:
                tokens, sentence = self._models["base"].encode_text(texts)
                out["caption.base_sentence"] = _f16(sentence)
                out["caption.base_tokens"] = _f16(tokens)
        return out


def _f16(x: Any) -> np.ndarray:
    return x.float().cpu().numpy().astype(np.float16)
