"""Small trainable encoders for ``caption`` and ``semantics``: the embedded default needs no weights.

Composer encodes captions with frozen CLIP text (and T5) models and ``semantics`` with the frozen
CLIP image encoder (§3.1). Those weights cannot be downloaded everywhere (and not at all on the
embedded default's machine), so a model may instead learn these two encoders from scratch, jointly
with the UNet:

- ``HashTokenizer`` + ``TextEncoder``: words hashed into a fixed vocabulary (no vocabulary file to
  ship) and a small Transformer. Enough for the synthetic set's grammar captions; for natural
  captions use frozen CLIP/T5 embeddings from the decomposition shards.
- ``ImageEncoder``: a small CNN ending in a *narrow bottleneck* (a few numbers). Trained on the
  same image the UNet reconstructs, a wide embedding would let the UNet copy the picture through
  it; the bottleneck keeps only global properties (colours, kinds of things, style), which is the
  role of Composer's CLIP image embedding.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch
from torch import nn

PAD_ID = 0
SPECIAL_IDS = 1  # ids below this are reserved (padding)


class HashTokenizer:
    """Lower-cased words and punctuation hashed (CRC-32) into ``vocab_size`` ids; 0 pads.

    Deterministic across processes and machines, so nothing but ``vocab_size`` and ``length``
    needs saving. Two words may share an id (rare for small vocabularies).
    """

    _word = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, vocab_size: int, length: int):
        if vocab_size <= SPECIAL_IDS + 1:
            raise ValueError(f"vocab_size must be > {SPECIAL_IDS + 1}, got {vocab_size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.vocab_size = vocab_size
        self.length = length

    @classmethod
    def words(cls, text: str) -> list[str]:
        """The lower-cased words and punctuation of ``text``, one token each (before truncation)."""
        return cls._word.findall(text.lower())

    def token_id(self, word: str) -> int:
        return SPECIAL_IDS + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - SPECIAL_IDS)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,) strings -> (B, length) int64 ids, truncated and right-padded with 0."""
        ids = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} is {type(text).__name__}, expected str")
            words = self.words(text)[: self.length]
            if words:
                ids[i, : len(words)] = torch.tensor([self.token_id(w) for w in words])
        return ids


class TextEncoder(nn.Module):
    """Token ids (B, L) int64 -> tokens (B, L, width) and sentence (B, width) (masked mean).

    ``kernel`` > 1: each word's embedding first gets a 1-D convolution over its ``kernel``
    neighbours added (zero-padded at the ends), so a word's state holds the words next to it
    from the first step ("red" in "circle"'s, not in "square"'s): a Transformer from random
    initialisation attends almost uniformly, and learns from the diffusion loss only slowly to
    bind an attribute to its noun, so a caption starts out as a bag of words. 1: no convolution
    (models saved before this option).
    """

    def __init__(self, vocab_size: int, length: int, width: int, layers: int, heads: int, kernel: int = 1):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"text_kernel must be an odd number >= 1, got {kernel}")
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)  # N(0, 1) rows
        # Positions at the words' own scale. The Transformer is blind to word order but for them,
        # and order is what binds a colour to its shape ("a red circle above a blue square" and
        # "a blue circle above a red square" differ only in it). At 0.02 (50x below the words)
        # the encoder started, and after 2000 steps still was, a bag of words: position vectors
        # of norm 0.16 against words of 7.9 (benchmarks/RESULTS.md, "The reference model").
        self.position = nn.Parameter(torch.randn(length, width))
        self.neighbours = nn.Conv1d(width, width, kernel, padding=kernel // 2) if kernel > 1 else None
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ids != PAD_ID
        x = self.embed(ids)
        if self.neighbours is not None:
            x = x + self.neighbours(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.position[: ids.shape[1]]
        # Padding is not masked in attention (as CLIP in Stable Diffusion): an all-padding row
        # (empty caption) would otherwise have nothing to attend to.
        x = self.norm(self.transformer(x))
        weights = keep.unsqueeze(-1).to(x.dtype)
        sentence = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        return x, sentence


class ImageEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> (B, bottleneck) unit-norm embedding (like CLIP's)."""

    def __init__(self, bottleneck: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bottleneck = nn.Linear(chans[-1], bottleneck)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        z = self.bottleneck(self.features(image))
        return nn.functional.normalize(z, dim=-1)
