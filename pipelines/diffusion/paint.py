"""Paint-with-words (eDiffi §4.3) in the pipeline: phrases -> caption token positions, painted
regions -> a ``models.paint.Painting``, and a denoiser that paints every step.

A request's ``paint`` maps a phrase of its caption to a region (R, R), 1 = painted; the phrase is
found among the caption's tokens by the model's own tokenizer:

- the trainable caption encoder: the ``HashTokenizer``'s words (one token per word);
- a pretrained base (``--base``): its CLIP tokenizer (position 0 is the start token);
- frozen CLIP / T5 embeddings: the tokenizers of the decomposition's ``caption.clip_model`` /
  ``caption.t5_model`` (no weights are read); with ``clip+t5`` the T5 tokens follow the CLIP ones.

A phrase that is not in the caption (or past the tokens the model reads) is a ``PaintError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from models import CONDITIONS
from models.paint import PaintAttnProcessor, Painting

CAPTION = CONDITIONS.index("caption")


class PaintError(ValueError):
    """A paint request that cannot be honoured; the message names the phrase and why."""


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def _positions(caption_ids: Sequence[int], phrase_ids: Sequence[int], phrase: str, caption: str) -> list[int]:
    if not phrase_ids:
        raise PaintError(f"paint phrase {phrase!r} has no tokens")
    i = _find(caption_ids, phrase_ids)
    if i < 0:
        raise PaintError(
            f"paint phrase {phrase!r} is not in the caption {caption!r} (as the model tokenizes it, "
            "or it is past the tokens the model reads)"
        )
    return list(range(i, i + len(phrase_ids)))


def trainable_positions(caption: str, phrase: str, length: int) -> list[int]:
    from models.encoders import HashTokenizer

    words = HashTokenizer.words(caption)[:length]
    return _positions(words, HashTokenizer.words(phrase), phrase, caption)  # type: ignore[arg-type]


def clip_positions(tokenize: Callable[[list[str]], Any], caption: str, phrase: str) -> list[int]:
    """open_clip / CLIP-style tokenizers: ids with a start and an end token, 0-padded."""
    ids = [int(i) for i in tokenize([caption])[0] if int(i) != 0]
    core = [int(i) for i in tokenize([phrase])[0] if int(i) != 0][1:-1]
    return _positions(ids, core, phrase, caption)


def base_positions(tokenizer: Any, caption: str, phrase: str) -> list[int]:
    """A pretrained base's CLIPTokenizer, as ``encode_text`` pads the caption."""
    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    core = tokenizer(phrase, add_special_tokens=False).input_ids
    return _positions(ids.input_ids, core, phrase, caption)


def t5_positions(tokenizer: Any, caption: str, phrase: str, length: int) -> list[int]:
    ids = tokenizer(caption, max_length=length, truncation=True).input_ids
    core = tokenizer(phrase, add_special_tokens=False).input_ids
    return _positions(ids, core, phrase, caption)


class PhraseTokens:
    """Phrase -> context token positions for one pipeline's caption encoder."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self._tokenizers: dict[str, Any] = {}

    def _clip(self) -> Any:
        if "clip" not in self._tokenizers:
            import open_clip

            from pipelines.conditions.semantics import LOCAL_DIR, resolve_open_clip

            spec = (self.pipe.config.decompose.get("caption") or {}).get("clip_model")
            if spec is None:
                raise PaintError("paint-with-words: the pipeline's decomposition names no caption.clip_model")
            name = f"{LOCAL_DIR}{resolve_open_clip(spec, 'caption.clip_model')}"
            self._tokenizers["clip"] = open_clip.get_tokenizer(name)
        return self._tokenizers["clip"]

    def _t5(self) -> tuple[Any, int]:
        if "t5" not in self._tokenizers:
            from transformers import AutoTokenizer

            from pipelines.conditions.caption import CaptionConfig, _resolve_t5

            cfg = CaptionConfig(
                **{k: v for k, v in (self.pipe.config.decompose.get("caption") or {}).items()}
            )
            if cfg.t5_model is None:
                raise PaintError("paint-with-words: the pipeline's decomposition names no caption.t5_model")
            path = _resolve_t5(cfg.t5_model)
            self._tokenizers["t5"] = (
                AutoTokenizer.from_pretrained(path, local_files_only=True),
                cfg.t5_max_length,
            )
        return self._tokenizers["t5"]

    def __call__(self, caption: str, phrase: str) -> list[int]:
        cfg = self.pipe.unet.config
        encoder = cfg.caption_encoder
        if encoder == "trainable":
            return trainable_positions(caption, phrase, cfg.caption_length)
        if encoder == "base":
            return base_positions(self.pipe.tokenizer, caption, phrase)
        out: list[int] = []
        offset = 0
        for part in encoder.split("+"):  # clip+t5: T5's tokens after CLIP's (inputs.join_tokens)
            if part == "clip":
                tokenize = self._clip()
                out += [offset + p for p in clip_positions(tokenize, caption, phrase)]
                offset += int(tokenize([""]).shape[-1])
            else:
                tokenizer, length = self._t5()
                out += [offset + p for p in t5_positions(tokenizer, caption, phrase, length)]
                offset += length
        return out


def painting(
    pipe: Any,
    captions: Sequence[str | None],
    paints: Sequence[Mapping[str, np.ndarray] | None],
    sizes: Sequence[int],
    weights: Sequence[float],
) -> Painting:
    """The ``Painting`` of a batch: per request its caption, {phrase: (R, R) region} and weight,
    repeated for its ``sizes`` samples (requests without paint get no bias)."""
    r = pipe.image_size
    width = max([len(p) for p in paints if p] + [1])  # phrases per sample (padded with empty regions)
    length = pipe.unet.conditioner.null_caption.shape[0]
    regions, tokens, per_sample = [], [], []
    for caption, paint, n, w in zip(captions, paints, sizes, weights, strict=True):
        per_sample += [float(w)] * n
        reg = np.zeros((width, r, r), np.float32)
        tok = np.zeros((width, length), bool)
        for p, (phrase, region) in enumerate((paint or {}).items()):
            if caption is None:
                raise PaintError("paint-with-words paints phrases of the caption: give a caption (text)")
            region = np.asarray(region)
            if region.shape != (r, r):
                raise PaintError(f"paint region of {phrase!r} is {region.shape}, expected ({r}, {r})")
            if not (region > 0).any():
                raise PaintError(f"paint region of {phrase!r} is empty: paint where the phrase should go")
            reg[p] = region > 0
            tok[p, pipe.phrase_tokens(caption, phrase)] = True
        regions += [reg] * n
        tokens += [tok] * n
    return Painting(
        torch.from_numpy(np.stack(regions)), torch.from_numpy(np.stack(tokens)), torch.tensor(per_sample)
    )


class PaintedDenoiser:
    """A denoiser (``ComposerModel`` or ``ExpertEnsemble``) whose cross-attention layers paint:
    before each forward pass the step's σ and each row's sample (rows whose branch lacks the
    caption are not painted) are set on the painting."""

    def __init__(self, denoiser: Any, paint: Painting, alphas_cumprod: torch.Tensor):
        self.denoiser, self.paint, self.alphas = denoiser, paint, alphas_cumprod

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser.encode(*args, **kwargs)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, encoded: Any) -> torch.Tensor:
        parts = getattr(encoded, "parts", None)
        presence = (parts[0] if parts else encoded).presence
        samples = self.paint.regions.shape[0]
        rows = torch.arange(x.shape[0]) % samples
        if presence is not None:
            rows = torch.where(presence[:, CAPTION].cpu(), rows, torch.full_like(rows, -1))
        alpha = float(self.alphas[int(torch.as_tensor(t).flatten()[0])])
        self.paint.rows, self.paint.sigma = rows, ((1 - alpha) / alpha) ** 0.5
        return self.denoiser(x, t, encoded=encoded)


@contextlib.contextmanager
def painted(module: torch.nn.Module, paint: Painting) -> Iterator[None]:
    """Every cross-attention layer of ``module`` paints with ``paint`` inside the block."""
    from diffusers.models.attention_processor import Attention

    from models.backbone import ExtraTokensAttnProcessor

    restore: list[tuple[Any, Any]] = []
    try:
        for attn in module.modules():
            if not isinstance(attn, Attention) or not attn.is_cross_attention:
                continue
            if isinstance(attn.processor, ExtraTokensAttnProcessor):
                attn.processor.painting = paint
                restore.append((attn.processor, None))
            else:
                restore.append((attn, attn.processor))
                attn.set_processor(PaintAttnProcessor(paint))
        yield
    finally:
        for owner, processor in restore:
            if processor is None:
                owner.painting = None
            else:
                owner.set_processor(processor)
