"""How Composer's eight representations enter the UNet (Composer §3.2, arXiv 2302.09778).

- Global conditions (caption sentence embedding, ``semantics``, ``palette``) are each projected
  and *added to the timestep embedding*; ``semantics`` and ``palette`` are also projected into a
  few extra tokens appended to the caption tokens as cross-attention context (as unCLIP does
  with its CLIP image embedding).
- Local conditions (``sketch``, ``instances``, ``depth``, ``intensity`` and ``mask`` = masked
  image + binary mask) each go through a small conv stem; the stems' outputs are summed and
  concatenated to x_t.
- Any subset may be present. ``presence`` (B, 8) bool, columns in ``CONDITIONS`` order, says which
  are present in each row: an absent global condition becomes its learned null embedding/tokens,
  an absent local one contributes zeros, and ``presence`` itself is embedded and added to the
  timestep embedding so "absent" is never confused with "present and blank".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

# The representation names of the decomposition shards (pipelines/conditions), in presence order.
CONDITIONS: tuple[str, ...] = (
    "caption",
    "semantics",
    "palette",
    "sketch",
    "instances",
    "depth",
    "intensity",
    "mask",
)
GLOBAL_CONDITIONS = ("caption", "semantics", "palette")
LOCAL_CONDITIONS = ("sketch", "instances", "depth", "intensity", "mask")
INDEX = {name: i for i, name in enumerate(CONDITIONS)}
PALETTE_BINS = 156  # Composer's smoothed CIELab histogram (pipelines/conditions/palette.py)
INSTANCE_IDS = 256  # instance maps are uint8 ids, 0 = background


@dataclass
class Conditions:
    """The raw inputs of a batch of B rows; a field left ``None`` is absent in every row.

    Rows where ``presence`` marks a condition absent may hold anything in its field (zeros).
    Maps are at the *image* resolution (the model's sample size times ``local_downsample``).
    """

    text_ids: torch.Tensor | None = None  # (B, L) int64, trainable caption encoder (HashTokenizer)
    caption_sentence: torch.Tensor | None = None  # (B, Dc) frozen CLIP/T5 sentence embedding
    caption_tokens: torch.Tensor | None = None  # (B, Lc, Wc) frozen CLIP/T5 token states
    semantics: torch.Tensor | None = None  # (B, Ds) frozen CLIP image embedding
    semantics_image: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], trainable encoder
    palette: torch.Tensor | None = None  # (B, 156) histogram, sums to 1
    sketch: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1], 1 = edge
    instances: torch.Tensor | None = None  # (B, H, W) int64 ids in [0, 255], 0 = background
    depth: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1], 1 = nearest
    intensity: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1]
    mask: torch.Tensor | None = None  # (B, 1, H, W) {0, 1}, 1 = region to regenerate
    masked_image: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], 0 inside the mask
    # Upsamplers only (``upsample_factor`` > 1), in every row, outside presence and dropout: the
    # image to upsample at H / factor, noise-augmented (models/objective.py, ``noise_low_res``),
    # and the timestep of that augmentation (0: clean).
    low_res: torch.Tensor | None = None  # (B, 3, H/f, W/f) in [-1, 1]
    low_res_level: torch.Tensor | None = None  # (B,) int64

    def fields(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def batch_size(self) -> int | None:
        sizes = {v.shape[0] for v in self.fields().values()}
        if len(sizes) > 1:
            raise ValueError(f"condition inputs disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    def map(self, fn) -> Conditions:
        """A copy with ``fn`` applied to every given tensor."""
        return Conditions(**{k: fn(v) for k, v in self.fields().items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditions:
        """Moves every tensor to ``device``; floating ones also to ``dtype`` when given."""

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return self.map(move)

    def repeat(self, n: int) -> Conditions:
        """Each tensor tiled ``n`` times along the batch (rows 0..B-1, then again, ...)."""
        return self.map(lambda v: v.repeat(n, *([1] * (v.ndim - 1))))


@dataclass
class EncodedConditions:
    """Conditions as the UNet takes them; computed once per sampling run, reused every step."""

    embedding: torch.Tensor  # (B, T) added to the timestep embedding
    context: torch.Tensor  # (B, N, C) cross-attention tokens
    local: torch.Tensor  # (B, Cl, h, w) concatenated to x_t
    presence: torch.Tensor | None = None  # (B, 8) bool: which conditions each row holds

    _FIELDS = ("embedding", "context", "local", "presence")

    def __len__(self) -> int:
        return self.embedding.shape[0]

    def select(self, rows: torch.Tensor) -> EncodedConditions:
        """The rows ``rows`` (an index tensor) of every field."""
        return EncodedConditions(
            *(None if (v := getattr(self, f)) is None else v[rows] for f in self._FIELDS)
        )

    @staticmethod
    def cat(items: list[EncodedConditions]) -> EncodedConditions:
        fields = []
        for f in EncodedConditions._FIELDS:
            values = [getattr(e, f) for e in items]
            fields.append(None if any(v is None for v in values) else torch.cat(values))
        return EncodedConditions(*fields)


def check_presence(presence: torch.Tensor, batch: int) -> torch.Tensor:
    if presence.dtype != torch.bool or presence.shape != (batch, len(CONDITIONS)):
        raise ValueError(
            f"presence must be a ({batch}, {len(CONDITIONS)}) bool tensor, columns {CONDITIONS}; "
            f"got {presence.dtype} {tuple(presence.shape)}"
        )
    return presence


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    # LayerNorm first: the inputs come at very different scales (unit-norm CLIP vectors of 512+
    # numbers, a histogram's square root, Transformer states), and an input far below unit
    # variance starts out drowned by the others.
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


class GlobalConditioner(nn.Module):
    """Caption, semantics and palette -> (timestep-embedding addend, cross-attention tokens)."""

    def __init__(
        self,
        embed_dim: int,
        context_dim: int,
        caption_sentence_dim: int,
        caption_token_dim: int,
        caption_length: int,
        semantics_dim: int,
        semantics_tokens: int,
        palette_tokens: int,
        caption_passthrough: bool = False,
    ):
        super().__init__()
        self.context_dim = context_dim
        self.semantics_tokens = semantics_tokens
        self.palette_tokens = palette_tokens
        self.caption_embed = _mlp(caption_sentence_dim, embed_dim)
        self.semantics_embed = _mlp(semantics_dim, embed_dim)
        self.palette_embed = _mlp(PALETTE_BINS, embed_dim)
        self.presence_embed = nn.Linear(len(CONDITIONS), embed_dim)
        self.null_embed = nn.Parameter(torch.zeros(len(GLOBAL_CONDITIONS), embed_dim))
        # passthrough: the caption tokens are a pretrained base's own cross-attention context
        # (models/backbone.py), used unchanged; an absent caption is the base's empty-prompt
        # embedding, a buffer that the base fills in (ComposerModel.from_base).
        if caption_passthrough and caption_token_dim != context_dim:
            raise ValueError(
                f"passed-through caption tokens must be {context_dim} wide, got {caption_token_dim}"
            )
        self.caption_context = (
            nn.Identity() if caption_passthrough else nn.Linear(caption_token_dim, context_dim)
        )
        self.semantics_context = nn.Sequential(
            nn.LayerNorm(semantics_dim), nn.Linear(semantics_dim, semantics_tokens * context_dim)
        )
        self.palette_context = nn.Sequential(
            nn.LayerNorm(PALETTE_BINS), nn.Linear(PALETTE_BINS, palette_tokens * context_dim)
        )
        if caption_passthrough:
            self.register_buffer("null_caption", torch.zeros(caption_length, context_dim))
        else:
            self.null_caption = nn.Parameter(torch.randn(caption_length, context_dim) * 0.02)
        self.null_semantics = nn.Parameter(torch.randn(semantics_tokens, context_dim) * 0.02)
        self.null_palette = nn.Parameter(torch.randn(palette_tokens, context_dim) * 0.02)

    def forward(
        self,
        presence: torch.Tensor,
        caption_sentence: torch.Tensor | None,
        caption_tokens: torch.Tensor | None,
        semantics: torch.Tensor | None,
        palette: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """presence (B, 8) bool -> embedding (B, T), context (B, Lc + Ns + Np, C)."""
        b = presence.shape[0]
        dtype = self.null_embed.dtype
        if palette is not None:
            # Square root of the histogram (Hellinger embedding): unit L2 norm, and rare colours
            # are not drowned by the dominant one.
            palette = palette.to(dtype).clamp(min=0).sqrt()
        inputs = {"caption": caption_sentence, "semantics": semantics, "palette": palette}
        token_inputs = {"caption": caption_tokens, "semantics": semantics, "palette": palette}
        embed_fns = {
            "caption": self.caption_embed,
            "semantics": self.semantics_embed,
            "palette": self.palette_embed,
        }
        context_fns = {
            "caption": lambda x: self.caption_context(x),
            "semantics": lambda x: self.semantics_context(x).view(b, self.semantics_tokens, self.context_dim),
            "palette": lambda x: self.palette_context(x).view(b, self.palette_tokens, self.context_dim),
        }
        nulls = {"caption": self.null_caption, "semantics": self.null_semantics, "palette": self.null_palette}
        embedding = self.presence_embed(presence.to(dtype))
        context = []
        for k, name in enumerate(GLOBAL_CONDITIONS):
            on = presence[:, INDEX[name]]
            null_e = self.null_embed[k].expand(b, -1)
            null_c = nulls[name].expand(b, -1, -1)
            if inputs[name] is None or token_inputs[name] is None:
                if on.any():
                    raise ValueError(f"presence marks {name!r} present but no {name} input was given")
                embedding = embedding + null_e
                context.append(null_c)
                continue
            e = embed_fns[name](inputs[name].to(dtype))
            c = context_fns[name](token_inputs[name].to(dtype))
            if c.shape[1:] != null_c.shape[1:]:
                raise ValueError(
                    f"{name} tokens are {tuple(c.shape[1:])}, the model expects {tuple(null_c.shape[1:])}"
                )
            embedding = embedding + torch.where(on[:, None], e, null_e)
            context.append(torch.where(on[:, None, None], c, null_c))
        return embedding, torch.cat(context, dim=1)


class LocalConditioner(nn.Module):
    """Sketch, instances, depth, intensity and mask -> summed features (B, Cl, H/f, W/f).

    ``downsample`` f > 1 brings image-resolution maps to a VAE's latent resolution (f = 8 for
    Stable Diffusion's VAE) with stride-2 convolutions; f = 1 in pixel space.
    """

    in_channels = {"sketch": 1, "instances": 8, "depth": 1, "intensity": 1, "mask": 4}

    def __init__(self, out_channels: int, hidden: int, downsample: int):
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"local_downsample must be a power of two >= 1, got {downsample}")
        self.instance_embed = nn.Embedding(INSTANCE_IDS, self.in_channels["instances"])
        self.stems = nn.ModuleDict()
        for name, cin in self.in_channels.items():
            layers: list[nn.Module] = [nn.Conv2d(cin, hidden, 3, padding=1), nn.SiLU()]
            for _ in range(int(math.log2(downsample))):
                layers += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
            layers.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
            self.stems[name] = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.downsample = downsample

    def forward(
        self, presence: torch.Tensor, maps: dict[str, torch.Tensor | None], size: tuple[int, int]
    ) -> torch.Tensor:
        """presence (B, 8) bool; maps name -> (B, C, H, W) (instances (B, H, W) ids) -> (B, Cl, h, w)."""
        b = presence.shape[0]
        dtype = self.instance_embed.weight.dtype
        out = torch.zeros(b, self.out_channels, *size, dtype=dtype, device=presence.device)
        want = (size[0] * self.downsample, size[1] * self.downsample)
        for name in LOCAL_CONDITIONS:
            x = maps.get(name)
            on = presence[:, INDEX[name]]
            if x is None:
                if on.any():
                    raise ValueError(f"presence marks {name!r} present but no {name} input was given")
                continue
            if name == "instances":
                x = self.instance_embed(x.long().clamp(0, INSTANCE_IDS - 1)).permute(0, 3, 1, 2)
            if tuple(x.shape[-2:]) != want or x.shape[1] != self.in_channels[name]:
                raise ValueError(
                    f"{name} input is {tuple(x.shape)}, expected (B, {self.in_channels[name]}, {want[0]}, {want[1]})"
                )
            out = out + self.stems[name](x.to(dtype)) * on[:, None, None, None].to(dtype)
        return out
