"""Named model sizes, ``tiny`` (tests, CPU) to ``base`` (GPU cluster). All in pixel space, 64×64
as Composer's base model; docs/model.md lists parameter counts (``python -m models``).

Composer's own base model is ~2B parameters (GLIDE/unCLIP-sized, §4); ``base`` here is the
largest size that still trains with a sensible batch on one 80 GB GPU per worker.
"""

from __future__ import annotations

import inspect
from typing import Any

from models.composer import ComposerModel

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests and the CPU embedded default: seconds per step on 2 cores.
    "tiny": dict(
        block_out_channels=(32, 64),
        attention_levels=(False, True),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=64,
        local_channels=8,
        local_hidden=16,
        caption_sentence_dim=64,
        caption_token_dim=64,
        text_layers=2,
        text_kernel=3,
        semantics_dim=8,
    ),
    # Learns the synthetic set on one GPU in minutes.
    "small": dict(
        block_out_channels=(64, 128, 256),
        attention_levels=(False, True, True),
        layers_per_block=2,
        attention_head_dim=32,
        norm_num_groups=32,
        cross_attention_dim=256,
        local_channels=16,
        local_hidden=32,
        caption_sentence_dim=256,
        caption_token_dim=256,
        text_layers=4,
        text_kernel=3,
        semantics_dim=16,
    ),
    "medium": dict(
        block_out_channels=(128, 256, 384, 512),
        attention_levels=(False, True, True, True),
        layers_per_block=2,
        attention_head_dim=64,
        norm_num_groups=32,
        cross_attention_dim=512,
        local_channels=32,
        local_hidden=64,
        caption_sentence_dim=512,
        caption_token_dim=512,
        text_layers=6,
        text_kernel=3,
        semantics_dim=32,
        semantics_tokens=4,
        palette_tokens=4,
    ),
    # GPU cluster: natural images with frozen CLIP/T5 caption and CLIP semantics embeddings.
    "base": dict(
        block_out_channels=(256, 512, 768, 1024),
        attention_levels=(False, True, True, True),
        layers_per_block=3,
        attention_head_dim=64,
        norm_num_groups=32,
        cross_attention_dim=1024,
        local_channels=64,
        local_hidden=128,
        caption_sentence_dim=768,
        caption_token_dim=768,
        caption_length=77,
        text_layers=12,
        text_kernel=3,
        semantics_dim=64,
        semantics_tokens=4,
        palette_tokens=4,
    ),
    # Upsamplers of the cascade (``recompose train --stage upsampler``): Imagen's Efficient U-Net
    # idea — attention only at the lowest-resolution level, the cost where the pixels are spent
    # on convolutions; otherwise the base sizes' condition widths.
    "upsampler-tiny": dict(
        block_out_channels=(16, 32, 64),
        attention_levels=(False, False, True),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=64,
        local_channels=8,
        local_hidden=16,
        caption_sentence_dim=64,
        caption_token_dim=64,
        text_layers=2,
        text_kernel=3,
        semantics_dim=8,
    ),
    "upsampler-small": dict(
        block_out_channels=(64, 128, 256, 256),
        attention_levels=(False, False, False, True),
        layers_per_block=2,
        attention_head_dim=32,
        norm_num_groups=32,
        cross_attention_dim=256,
        local_channels=16,
        local_hidden=32,
        caption_sentence_dim=256,
        caption_token_dim=256,
        text_layers=4,
        text_kernel=3,
        semantics_dim=16,
    ),
    # 64→256 / 256→1024 on a GPU cluster, with the base preset's frozen-embedding conditions.
    "upsampler-base": dict(
        block_out_channels=(128, 256, 512, 1024),
        attention_levels=(False, False, False, True),
        layers_per_block=3,
        attention_head_dim=64,
        norm_num_groups=32,
        cross_attention_dim=1024,
        local_channels=64,
        local_hidden=128,
        caption_sentence_dim=768,
        caption_token_dim=768,
        caption_length=77,
        text_layers=12,
        text_kernel=3,
        semantics_dim=64,
        semantics_tokens=4,
        palette_tokens=4,
    ),
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    known = set(inspect.signature(ComposerModel.__init__).parameters) - {"self"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(
            f"unknown model settings {sorted(unknown)}; known settings: {', '.join(sorted(known))}"
        )
    return {**PRESETS[name], **overrides}


def build_model(name: str, **overrides: Any) -> ComposerModel:
    """A randomly initialised ``ComposerModel`` of preset ``name``."""
    return ComposerModel(**preset_config(name, **overrides))


def parameter_counts() -> dict[str, int]:
    return {name: sum(p.numel() for p in build_model(name).parameters()) for name in PRESETS}
