"""``ComposerModel``: a stock diffusers ``UNet2DConditionModel`` conditioned on any subset of the
eight representations (Composer, arXiv 2302.09778, §3.2). Read top to bottom:

    encode(conditions, presence) -> EncodedConditions      once per sample / sampling run
    forward(x_t, t, encoded)     -> epsilon                 every denoising step

In pixel space (the base model, 64×64 as in Composer) x_t is the image; given a VAE the same
code runs on latents with ``image_channels`` = latent channels and ``local_downsample`` = the VAE's
scale factor, so local maps stay at image resolution.

An **upsampler** of Composer's cascade (``upsample_factor`` f = 2–4; §3, as Imagen's and unCLIP's
super-resolution models) is the same network with one more input: the low-resolution image
(side / f), upsampled bicubically and concatenated to x_t, with the timestep of its
noise-conditioning augmentation (Imagen §2.5) embedded and added to the timestep embedding. The
eight conditions stay optional at the target resolution, with the same dropout and set guidance;
the low-resolution image is in every row and every guidance branch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from models.backbone import add_lora, base_state_dict, build_unet, is_new_parameter
from models.conditioning import (
    CONDITIONS,
    PALETTE_BINS,
    Conditions,
    EncodedConditions,
    GlobalConditioner,
    LocalConditioner,
    check_presence,
)
from models.encoders import HashTokenizer, ImageEncoder, TextEncoder

# "clip+t5": both frozen embeddings at once (as eDiffi); pipelines/diffusion/inputs.py joins them —
# sentence vectors concatenated, token sequences one after the other in disjoint feature columns —
# so the widths/lengths below are the sums of the two encoders'.
# "base": a pretrained base's own text-encoder states (models/backbone.py), passed through.
CAPTION_ENCODERS = ("trainable", "clip", "t5", "clip+t5", "base")


class ComposerModel(ModelMixin, ConfigMixin):
    """Multi-conditional noise predictor; the constructor arguments are its saved config."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        image_channels: int = 3,
        local_downsample: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64),
        attention_levels: tuple[bool, ...] = (False, True),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        cross_attention_dim: int = 64,
        local_channels: int = 8,
        local_hidden: int = 16,
        caption_encoder: Literal["trainable", "clip", "t5", "clip+t5", "base"] = "trainable",
        caption_sentence_dim: int = 64,
        caption_token_dim: int = 64,
        caption_length: int = 24,
        text_vocab_size: int = 4096,
        text_layers: int = 2,
        text_heads: int = 4,
        text_kernel: int = 1,  # trainable caption encoder: words mixed with neighbours first (TextEncoder)
        semantics_encoder: Literal["trainable", "clip"] = "trainable",
        semantics_dim: int = 8,
        semantics_tokens: int = 2,
        palette_tokens: int = 2,
        # "scale_shift": the timestep + global-condition embedding scales and shifts every
        # ResNet block's normalised features (AdaGN, as the ADM/GLIDE UNets Composer builds on);
        # "default": it is added to them (diffusers' default).
        resnet_time_scale_shift: Literal["default", "scale_shift"] = "default",
        # A pretrained Stable Diffusion–family UNet's config (``from_base``): the UNet is that
        # architecture with zero-start condition paths (models/backbone.py), and the settings
        # above that shape a UNet (channels, levels, heads, groups) are not used.
        base_unet: dict | None = None,
        lora_rank: int = 0,  # base models: peft LoRA rank on the base's attention projections (0: none)
        upsample_factor: int = 1,  # 2–4: an upsampler from side / factor (module doc); 1: a base model
        # an upsampler that denoises the residual over the bicubic upsampling of its clean input
        # (SRDiff, Li et al. 2022): x_0 = image - upsample_bicubic(low_res); ``residual_base``
        upsample_residual: bool = False,
    ):
        super().__init__()
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"resnet_time_scale_shift must be 'default' or 'scale_shift', got {resnet_time_scale_shift!r}"
            )
        if len(attention_levels) != len(block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if caption_encoder not in CAPTION_ENCODERS:
            raise ValueError(f"caption_encoder must be one of {CAPTION_ENCODERS}, got {caption_encoder!r}")
        if semantics_encoder not in ("trainable", "clip"):
            raise ValueError(f"semantics_encoder must be 'trainable' or 'clip', got {semantics_encoder!r}")
        if caption_encoder == "trainable" and caption_sentence_dim != caption_token_dim:
            raise ValueError(
                "the trainable caption encoder has one width: caption_sentence_dim == caption_token_dim"
            )
        if any(c % attention_head_dim for c in block_out_channels):
            raise ValueError(
                f"attention_head_dim {attention_head_dim} must divide every block_out_channels entry"
            )
        if (base_unet is None) != (caption_encoder != "base"):
            raise ValueError(
                "caption_encoder 'base' goes with base_unet (ComposerModel.from_base), and only with it"
            )
        if lora_rank < 0 or (lora_rank and base_unet is None):
            raise ValueError(f"lora_rank is for base models and >= 0, got {lora_rank}")
        if upsample_factor not in (1, 2, 3, 4):
            raise ValueError(
                f"upsample_factor must be 1 (a base model) or 2–4 (an upsampler), got {upsample_factor}"
            )
        if upsample_factor > 1 and (base_unet is not None or local_downsample != 1):
            raise ValueError(
                "an upsampler (upsample_factor > 1) is a pixel-space model: no base_unet, local_downsample 1"
            )
        if upsample_residual and upsample_factor == 1:
            raise ValueError("upsample_residual is for an upsampler (upsample_factor 2–4)")
        if sample_size % upsample_factor:
            raise ValueError(
                f"sample_size {sample_size} is not a multiple of upsample_factor {upsample_factor}"
            )
        self.embed_out = None
        if base_unet is not None:
            for key, want in (("in_channels", image_channels), ("cross_attention_dim", cross_attention_dim)):
                if base_unet.get(key) != want:
                    raise ValueError(f"base_unet has {key}={base_unet.get(key)}, the model {want}")
            self.unet = build_unet(base_unet, local_channels, semantics_tokens + palette_tokens)
            if lora_rank:
                add_lora(self.unet, lora_rank)
            embed_dim = self.unet.time_embedding.linear_2.out_features
            # The global conditions' embedding joins the base's timestep embedding through a
            # zero-initialised layer: exactly the base until trained.
            self.embed_out = nn.Linear(embed_dim, embed_dim)
            nn.init.zeros_(self.embed_out.weight)
            nn.init.zeros_(self.embed_out.bias)
        else:
            embed_dim = block_out_channels[0] * 4  # UNet2DConditionModel's timestep-embedding width
            self.unet = UNet2DConditionModel(
                sample_size=sample_size,
                # an upsampler's low-resolution image is concatenated after the local features
                in_channels=image_channels + local_channels + (image_channels if upsample_factor > 1 else 0),
                out_channels=image_channels,
                down_block_types=tuple(
                    "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels
                ),
                up_block_types=tuple(
                    "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)
                ),
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                # diffusers reads `attention_head_dim` as the number of heads (a naming slip it keeps
                # for old configs, diffusers issue #2011), so give it per-block head counts instead.
                attention_head_dim=tuple(c // attention_head_dim for c in block_out_channels),
                norm_num_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                # The global-condition embedding arrives as `class_labels` and is added as is.
                class_embed_type="identity",
                resnet_time_scale_shift=resnet_time_scale_shift,
            )
        self.conditioner = GlobalConditioner(
            embed_dim=embed_dim,
            context_dim=cross_attention_dim,
            caption_sentence_dim=caption_sentence_dim,
            caption_token_dim=caption_token_dim,
            caption_length=caption_length,
            semantics_dim=semantics_dim,
            semantics_tokens=semantics_tokens,
            palette_tokens=palette_tokens,
            caption_passthrough=base_unet is not None,
        )
        self.local = LocalConditioner(local_channels, local_hidden, local_downsample)
        self.text_encoder = (
            TextEncoder(
                text_vocab_size, caption_length, caption_token_dim, text_layers, text_heads, text_kernel
            )
            if caption_encoder == "trainable"
            else None
        )
        self.image_encoder = ImageEncoder(semantics_dim) if semantics_encoder == "trainable" else None
        self.low_res_level = None
        if upsample_factor > 1:  # the augmentation level, embedded as the UNet embeds its timestep
            width = block_out_channels[0]
            self.low_res_level = nn.Sequential(
                Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0),
                TimestepEmbedding(width, embed_dim),
            )

    # -- inputs ------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of the images (and of every local map) the model takes, in pixels."""
        return self.config.sample_size * self.config.local_downsample

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, caption_length) ids for the trainable caption encoder."""
        if self.text_encoder is None:
            raise ValueError(f"this model takes {self.config.caption_encoder} caption embeddings, not text")
        return HashTokenizer(self.config.text_vocab_size, self.config.caption_length)(texts)

    def encode_semantics(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, semantics_dim) embedding, trainable encoder only."""
        if self.image_encoder is None:
            raise ValueError("this model takes CLIP semantics embeddings; decompose the image with CLIP")
        return self.image_encoder(image.to(self.device, self.dtype))

    @classmethod
    def from_base(
        cls,
        base: UNet2DConditionModel,
        null_caption: torch.Tensor,
        sentence_dim: int,
        local_downsample: int,
        sample_size: int | None = None,
        lora_rank: int = 0,
        **settings,
    ) -> ComposerModel:
        """A Composer UNet whose output is exactly ``base``'s until trained (models/backbone.py).

        ``null_caption`` (L, W): the base text encoder's states for the empty prompt (the absent
        caption); ``sentence_dim``: the width of its pooled vector; ``local_downsample``: the VAE's
        scale factor; ``sample_size``: the latent side (default: the base's); ``settings``: the
        condition paths' other ``ComposerModel`` arguments (``local_channels``, ``semantics_dim``, …).
        """
        cfg = {k: v for k, v in base.config.items() if not k.startswith("_")}
        if null_caption.ndim != 2 or null_caption.shape[1] != cfg.get("cross_attention_dim"):
            raise ValueError(
                f"null_caption must be (length, {cfg.get('cross_attention_dim')}), got {tuple(null_caption.shape)}"
            )
        model = cls(
            sample_size=sample_size or cfg["sample_size"],
            image_channels=cfg["in_channels"],
            local_downsample=local_downsample,
            cross_attention_dim=cfg["cross_attention_dim"],
            caption_encoder="base",
            caption_sentence_dim=sentence_dim,
            caption_token_dim=cfg["cross_attention_dim"],
            caption_length=null_caption.shape[0],
            base_unet=cfg,
            lora_rank=lora_rank,
            **settings,
        )
        model.load_base(base, null_caption)
        return model

    def load_base(self, base: UNet2DConditionModel, null_caption: torch.Tensor) -> None:
        """The base UNet's weights and its empty-prompt states into this base model (built from the
        base's config): afterwards the model's output is exactly the base's (``from_base``)."""
        if self.config.base_unet is None:
            raise ValueError("load_base is for models built on a base UNet (base_unet)")
        ours = self.unet.state_dict()
        weights = {}
        for key, value in base_state_dict(base).items():
            # peft's LoRA wraps a projection: its own weight moves to `<name>.base_layer.<param>`
            name, _, param = key.rpartition(".")
            wrapped = f"{name}.base_layer.{param}"
            weights[key if key in ours else wrapped] = value
        result = self.unet.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not is_new_parameter(f"unet.{k}")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the base UNet's weights do not fit this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        with torch.no_grad():
            self.conditioner.null_caption.copy_(null_caption.to(self.conditioner.null_caption))

    # -- the two steps -----------------------------------------------------------------------
    def encode(self, conditions: Conditions, presence: torch.Tensor) -> EncodedConditions:
        """Raw condition inputs and presence (B, 8) bool (``CONDITIONS`` order) -> UNet inputs."""
        b = presence.shape[0]
        check_presence(presence, b)
        given = conditions.batch_size()
        if given is not None and given != b:
            raise ValueError(f"conditions have batch size {given}, presence has {b} rows")
        presence = presence.to(self.device)
        c = conditions.to(self.device, self.dtype)
        sentence, tokens = c.caption_sentence, c.caption_tokens
        if self.text_encoder is not None:
            if sentence is not None or tokens is not None:
                raise ValueError("this model encodes captions itself: give text_ids, not caption embeddings")
            if c.text_ids is not None:
                tokens, sentence = self.text_encoder(c.text_ids)
        elif c.text_ids is not None:
            raise ValueError(
                f"this model takes {self.config.caption_encoder} caption embeddings, not text_ids"
            )
        semantics = c.semantics
        if self.image_encoder is not None:
            # An embedding may also be given directly (from ``encode_semantics``), e.g. to
            # interpolate between two images' embeddings.
            if semantics is not None and c.semantics_image is not None:
                raise ValueError("give semantics_image or a semantics embedding, not both")
            if c.semantics_image is not None:
                semantics = self.image_encoder(c.semantics_image)
        elif c.semantics_image is not None:
            raise ValueError("this model takes CLIP semantics embeddings, not semantics_image")
        embedding, context = self.conditioner(presence, sentence, tokens, semantics, c.palette)
        if self.embed_out is not None:
            embedding = self.embed_out(embedding)
        mask = None
        if c.mask is not None or c.masked_image is not None:
            if c.mask is None or c.masked_image is None:
                raise ValueError("the mask condition needs both mask and masked_image")
            if c.mask.shape[-2:] != c.masked_image.shape[-2:]:
                raise ValueError(
                    f"mask is {tuple(c.mask.shape)} but masked_image {tuple(c.masked_image.shape)}"
                )
            mask = torch.cat([c.masked_image, c.mask], dim=1)
        maps = {
            "sketch": c.sketch,
            "instances": c.instances,
            "depth": c.depth,
            "intensity": c.intensity,
            "mask": mask,
        }
        size = (self.config.sample_size, self.config.sample_size)
        local = self.local(presence, maps, size)
        if self.low_res_level is not None:
            up, level = self._low_res(c, b)
            embedding = embedding + level.to(embedding.dtype)
            local = torch.cat([local, up.to(local.dtype)], dim=1)
        elif c.low_res is not None or c.low_res_level is not None:
            raise ValueError("low_res is an upsampler's input; this model has upsample_factor 1")
        return EncodedConditions(embedding=embedding, context=context, local=local, presence=presence)

    def residual_base(self, low_res: torch.Tensor) -> torch.Tensor:
        """What a residual upsampler's x_0 is relative to: the clean low-resolution image (B, C,
        S/f, S/f) in [-1, 1] upsampled bicubically to the sample size (B, C, S, S)."""
        side = self.config.sample_size
        return F.interpolate(low_res.float(), size=(side, side), mode="bicubic", align_corners=False).to(
            low_res.dtype
        )

    def _low_res(self, c: Conditions, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An upsampler's low-resolution input, upsampled to the sample size, and its level's embedding."""
        f, side = self.config.upsample_factor, self.config.sample_size
        if c.low_res is None or c.low_res_level is None:
            raise ValueError(f"this upsampler (factor {f}) needs low_res and low_res_level in every row")
        want = (b, self.config.image_channels, side // f, side // f)
        if tuple(c.low_res.shape) != want:
            raise ValueError(
                f"low_res must be {want} (the image at 1/{f} of {side} px), got {tuple(c.low_res.shape)}"
            )
        if c.low_res_level.shape != (b,):
            raise ValueError(f"low_res_level must be ({b},), got {tuple(c.low_res_level.shape)}")
        up = F.interpolate(c.low_res.float(), size=(side, side), mode="bicubic", align_corners=False)
        proj, embed = self.low_res_level
        return up, embed(proj(c.low_res_level).to(self.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoded: EncodedConditions | None = None,
        conditions: Conditions | None = None,
        presence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, C, S, S) and timesteps (B,) -> predicted noise (B, C, S, S).

        Give ``encoded`` (from ``encode``), or ``conditions`` and ``presence`` to encode here —
        training does the latter so that DDP sees every parameter used in ``forward``.
        """
        if encoded is None:
            if presence is None:
                raise ValueError("give encoded, or conditions and presence")
            encoded = self.encode(conditions or Conditions(), presence)
        if len(encoded) != sample.shape[0]:
            raise ValueError(f"x_t has {sample.shape[0]} rows, the encoded conditions {len(encoded)}")
        x = torch.cat([sample, encoded.local.to(sample.dtype)], dim=1)
        return self.unet(
            x,
            timestep,
            encoder_hidden_states=encoded.context,
            class_labels=encoded.embedding,
            return_dict=False,
        )[0]


def random_inputs(
    model: ComposerModel, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, Conditions, torch.Tensor]:
    """Random inputs in the model's formats, for benchmarks and checks: x0 (B, C, S, S) in [-1, 1],
    every condition its encoders take (``random_conditions``), presence (B, 8) all True."""
    cfg, g = model.config, generator
    conditions = random_conditions(model, batch, g)
    s = cfg.sample_size
    x0 = torch.rand(batch, cfg.image_channels, s, s, generator=g) * 2 - 1
    return x0, conditions, torch.ones(batch, len(CONDITIONS), dtype=torch.bool)


def random_conditions(model: ComposerModel, batch: int, generator: torch.Generator) -> Conditions:
    """Every condition ``model``'s encoders take (and an upsampler's low-resolution input),
    filled with plausible random values."""
    cfg, g, size = model.config, generator, model.image_size
    if cfg.caption_encoder == "trainable":
        caption = {
            "text_ids": torch.randint(1, cfg.text_vocab_size, (batch, cfg.caption_length), generator=g)
        }
    else:
        caption = {
            "caption_sentence": torch.randn(batch, cfg.caption_sentence_dim, generator=g),
            "caption_tokens": torch.randn(batch, cfg.caption_length, cfg.caption_token_dim, generator=g),
        }
    if cfg.semantics_encoder == "trainable":
        semantics = {"semantics_image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1}
    else:
        semantics = {
            "semantics": torch.nn.functional.normalize(
                torch.randn(batch, cfg.semantics_dim, generator=g), dim=1
            )
        }
    low_res = {}
    if cfg.upsample_factor > 1:  # an upsampler's input: an image at 1/f, augmented up to level 250
        side = cfg.sample_size // cfg.upsample_factor
        low_res = {
            "low_res": torch.rand(batch, cfg.image_channels, side, side, generator=g) * 2 - 1,
            "low_res_level": torch.randint(0, 250, (batch,), generator=g),
        }
    return Conditions(
        **caption,
        **semantics,
        **low_res,
        palette=torch.softmax(torch.randn(batch, PALETTE_BINS, generator=g) * 3, dim=1),
        sketch=(torch.rand(batch, 1, size, size, generator=g) > 0.8).float(),
        instances=torch.randint(0, 256, (batch, size, size), generator=g),
        depth=torch.rand(batch, 1, size, size, generator=g),
        intensity=torch.rand(batch, 1, size, size, generator=g),
        mask=(torch.rand(batch, 1, size, size, generator=g) > 0.5).float(),
        masked_image=torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
    )
