"""``SemanticsPrior``: a diffusion prior from a caption to the semantics embedding (unCLIP §2.2,
Composer §3: the first model of the text-to-image cascade).

The semantics condition is an image embedding — CLIP's (``semantics_encoder: clip``) or, on the
embedded default, the base model's own trainable ``ImageEncoder`` (a unit-norm bottleneck). A
caption alone says nothing about it unless a prior samples one: given the caption, the prior
denoises an embedding, which the base model then takes as ``semantics`` with the caption.

The network is unCLIP's decoder-only Transformer, small: one sequence of [caption tokens, the
caption's sentence vector, the timestep, the noisy embedding, a learned query]; the query's
output predicts the clean embedding (x_0, as unCLIP's prior). Embeddings are standardised with the
training set's per-dimension mean and std (buffers, saved with the weights). The caption is
dropped for classifier-free guidance (a learned null caption). Caption inputs are those of the
base model: words through its own ``TextEncoder`` (trainable captions) or the decomposition's
frozen embeddings (``caption.*_sentence`` / ``caption.*_tokens``).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from models.encoders import HashTokenizer, ImageEncoder, TextEncoder


class SemanticsPrior(ModelMixin, ConfigMixin):
    """Caption -> semantics embedding, by denoising; the constructor arguments are its config."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 8,
        caption_encoder: Literal["trainable", "clip", "t5", "clip+t5"] = "trainable",
        caption_sentence_dim: int = 64,
        caption_token_dim: int = 64,
        caption_length: int = 24,
        text_vocab_size: int = 4096,
        text_layers: int = 2,
        text_heads: int = 4,
        text_kernel: int = 1,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        # the trainable semantics encoder's image -> embedding (ImageEncoder), frozen: the target
        # of training on the embedded default (its weights are the base model's); 0 = CLIP targets
        image_encoder_bottleneck: int = 0,
        normalize_output: bool = True,  # unit-norm samples, as CLIP's and ImageEncoder's embeddings
    ):
        super().__init__()
        if caption_encoder not in ("trainable", "clip", "t5", "clip+t5"):
            raise ValueError(
                f"caption_encoder must be trainable, clip, t5 or clip+t5, got {caption_encoder!r}"
            )
        if width % heads:
            raise ValueError(f"heads {heads} must divide width {width}")
        self.text_encoder = (
            TextEncoder(
                text_vocab_size, caption_length, caption_token_dim, text_layers, text_heads, text_kernel
            )
            if caption_encoder == "trainable"
            else None
        )
        self.image_encoder = ImageEncoder(image_encoder_bottleneck) if image_encoder_bottleneck else None
        if self.image_encoder is not None:
            self.image_encoder.requires_grad_(False)
        self.tokens_in = nn.Linear(caption_token_dim, width)
        self.sentence_in = nn.Linear(caption_sentence_dim, width)
        self.null_tokens = nn.Parameter(torch.zeros(caption_length, width))
        self.null_sentence = nn.Parameter(torch.zeros(width))
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.x_in = nn.Linear(embedding_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.position = nn.Parameter(torch.randn(caption_length + 4, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embedding_dim)
        self.register_buffer("mean", torch.zeros(embedding_dim))
        self.register_buffer("std", torch.ones(embedding_dim))

    # -- inputs ---------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError(f"this prior takes {self.config.caption_encoder} caption embeddings, not text")
        return HashTokenizer(self.config.text_vocab_size, self.config.caption_length)(texts)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the trainable semantics embedding the prior learns to sample."""
        if self.image_encoder is None:
            raise ValueError(
                "this prior learns CLIP embeddings: take them from the decomposition's semantics column"
            )
        return self.image_encoder(images.to(self.device, self.dtype))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.clamp(min=1e-4).to(self.std))

    def normalize(self, embedding: torch.Tensor) -> torch.Tensor:
        return (embedding - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        x = z * self.std + self.mean
        return nn.functional.normalize(x, dim=-1) if self.config.normalize_output else x

    def encode_caption(
        self,
        text_ids: torch.Tensor | None = None,
        sentence: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption as (tokens (B, L, W), sentence (B, W)) in the prior's width."""
        if self.text_encoder is not None:
            if text_ids is None:
                raise ValueError("this prior's captions are text: give text_ids (tokenize)")
            tokens, sentence = self.text_encoder(text_ids.to(self.device))
        elif sentence is None or tokens is None:
            raise ValueError(f"this prior takes {self.config.caption_encoder} caption sentence and tokens")
        length = self.config.caption_length
        tokens = tokens[:, :length].to(self.dtype)
        if tokens.shape[1] < length:
            tokens = nn.functional.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
        return self.tokens_in(tokens), self.sentence_in(sentence.to(self.dtype))

    # -- the network ------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        caption: tuple[torch.Tensor, torch.Tensor],
        presence: torch.Tensor,
    ) -> torch.Tensor:
        """Normalised noisy embeddings (B, D), timesteps (B,), the encoded caption and its presence
        (B,) bool -> the predicted clean normalised embeddings (B, D)."""
        tokens, sentence = caption
        b = sample.shape[0]
        keep = presence.to(self.device).view(b, 1).to(self.dtype)
        tokens = tokens * keep.unsqueeze(-1) + self.null_tokens * (1 - keep.unsqueeze(-1))
        sentence = sentence * keep + self.null_sentence * (1 - keep)
        t = torch.as_tensor(timestep, device=self.device).expand(b)
        time = self.time_embed(self.time_proj(t).to(self.dtype))
        seq = torch.cat(
            [
                tokens,
                sentence[:, None],
                time[:, None],
                self.x_in(sample.to(self.dtype))[:, None],
                self.query.expand(b, 1, -1),
            ],
            dim=1,
        )
        h = self.transformer(seq + self.position[: seq.shape[1]])
        return self.out(self.norm(h[:, -1]))


def prior_loss(
    prior: SemanticsPrior | nn.Module,
    scheduler,
    target: torch.Tensor,
    caption: tuple[torch.Tensor, torch.Tensor],
    presence: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """(B,) squared error of the predicted clean normalised embedding at uniformly drawn timesteps
    (unCLIP's prior objective); ``target`` (B, D) is already normalised."""
    b = target.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(target.shape, generator=generator).to(target)
    x_t = scheduler.add_noise(target, noise, t.to(target.device))
    pred = prior(x_t, t.to(target.device), caption, presence)
    return ((pred.float() - target.float()) ** 2).mean(-1)


@torch.no_grad()
def sample_prior(
    prior: SemanticsPrior,
    scheduler,
    caption: tuple[torch.Tensor, torch.Tensor],
    guidance: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Embeddings (B, D) for B encoded captions: DDIM over x_0 predictions, classifier-free
    guidance between the caption and the null caption (in x_0, as unCLIP's prior)."""
    b = caption[0].shape[0]
    x = torch.randn((b, prior.config.embedding_dim), generator=generator).to(prior.device, prior.dtype)
    scheduler.set_timesteps(steps)
    both = (torch.cat([caption[0], caption[0]]), torch.cat([caption[1], caption[1]]))
    presence = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)])
    for t in scheduler.timesteps:
        out = prior(torch.cat([x, x]), t.expand(2 * b), both, presence)
        cond, uncond = out.chunk(2)
        x0 = uncond + guidance * (cond - uncond)
        x = scheduler.step(x0, t, x).prev_sample
    return prior.denormalize(x.float())
