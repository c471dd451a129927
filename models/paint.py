"""Paint-with-words (eDiffi, Balaji et al. 2022, arXiv 2211.01324, §4.3): a phrase of the caption
painted onto a region attends more strongly there.

In every cross-attention layer the logits of the painted phrase's tokens get, at the query
positions inside its region,

    w · log(1 + σ) · max(QKᵀ)

added (QKᵀ scaled by 1/√d as the layer's own logits; its maximum over the layer's queries and
tokens, per row and head, and never below 0), where σ is the step's noise level (σ_t² = (1 − ᾱ_t)/ᾱ_t)
and w the paint weight. Regions are resized to each layer's query grid by area, so a query
half-covered by the region gets half the bias.

``Painting`` holds the regions and token masks of a batch's samples and, per forward pass, which
sample each row is and whether its branch holds the caption (a row without the caption — the
unconditional branch of guidance — is never painted). ``PaintAttnProcessor`` is a diffusers
attention processor (a plain cross-attention layer as ``AttnProcessor2_0`` computes it, plus the
bias); ``models/backbone.py``'s processor applies the same bias to its caption tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Painting:
    regions: torch.Tensor  # (B, P, H, W) float in [0, 1]: phrase p's region in sample b
    tokens: torch.Tensor  # (B, P, L) bool: phrase p's positions among the context tokens
    weight: torch.Tensor | float = 1.0  # w, or (B,) one per sample
    sigma: float = 0.0  # the current step's noise level, set before each forward pass
    rows: torch.Tensor | None = None  # (N,) int64: each row's sample, -1 = not painted

    def mask(self, queries: int, keys: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(N, 1, queries, keys): how much each (query, token) pair is painted, in [0, 1]."""
        if self.rows is None:
            raise RuntimeError("Painting.rows is not set: the painted denoiser sets it every step")
        side = math.isqrt(queries)
        if side * side != queries:
            raise ValueError(f"paint-with-words needs a square query grid, got {queries} positions")
        regions = F.interpolate(self.regions.float(), size=(side, side), mode="area")  # (B, P, s, s)
        regions = regions.flatten(2).to(device)  # (B, P, Q)
        tokens = self.tokens.float().to(device)
        if tokens.shape[-1] < keys:  # tokens after the caption's (semantics, palette) are never painted
            tokens = F.pad(tokens, (0, keys - tokens.shape[-1]))
        painted = torch.einsum("bpq,bpk->bqk", regions, tokens[..., :keys]).clamp(max=1.0)  # (B, Q, K)
        on = self.rows >= 0
        out = painted[self.rows.clamp(min=0).to(device)] * on.to(device)[:, None, None]
        return out.unsqueeze(1).to(dtype)

    def bias(self, logits: torch.Tensor) -> torch.Tensor:
        """The additive bias for ``logits`` (N, heads, Q, K), the layer's scaled QKᵀ."""
        top = logits.detach().amax(dim=(-2, -1), keepdim=True).clamp(min=0)
        weight = torch.as_tensor(self.weight, dtype=logits.dtype)
        if weight.ndim:  # one per sample: each row's own
            assert self.rows is not None
            weight = weight[self.rows.clamp(min=0)].to(logits.device).view(-1, 1, 1, 1)
        scale = weight * math.log1p(self.sigma)
        return scale * top * self.mask(logits.shape[-2], logits.shape[-1], logits.device, logits.dtype)


def painted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, painting: Painting) -> torch.Tensor:
    """softmax(QKᵀ/√d + bias) V for (N, heads, Q|K, d) tensors."""
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.softmax(logits + painting.bias(logits), dim=-1) @ v


def cross_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    text: torch.Tensor,
    painting: Painting | None = None,
    temb: torch.Tensor | None = None,
    extra: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """What diffusers' ``AttnProcessor2_0`` computes for a cross-attention layer (no attention
    mask) over the tokens ``text``, with the painting's bias on the logits when given; ``extra(q,
    split)`` adds another attention's output before the output projection (models/backbone.py)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    four_d = hidden_states.ndim == 4
    if four_d:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    b = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    query = attn.to_q(hidden_states)
    heads = attn.heads
    head_dim = query.shape[-1] // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, heads, head_dim).transpose(1, 2)

    q, key, value = split(query), split(attn.to_k(text)), split(attn.to_v(text))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if painting is not None:
        out = painted_attention(q, key, value, painting)
    else:
        out = F.scaled_dot_product_attention(q, key, value)
    if extra is not None:
        out = out + extra(q, split)
    out = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if four_d:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class PaintAttnProcessor:
    """``AttnProcessor2_0`` for a cross-attention layer, with the painting's bias on its logits."""

    def __init__(self, painting: Painting):
        self.painting = painting

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("PaintAttnProcessor is for cross-attention layers without an attention mask")
        return cross_attention(attn, hidden_states, encoder_hidden_states, self.painting, temb)
