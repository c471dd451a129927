"""``PriorPipeline``: the cascade's first stage, caption -> semantics embedding (unCLIP's prior).

A diffusers ``DiffusionPipeline`` with a ``SemanticsPrior`` (``models/prior.py``) and a DDIM
scheduler predicting x_0; saved and loaded as safetensors like ``ComposerPipeline``. Trained by
``recompose train --stage prior``; joined to a cascade with ``recompose cascade --prior``; used by
``recompose generate --prior`` and the API's ``prior`` flag when a caption is given without
semantics: the sampled embedding becomes the ``semantics`` condition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from models.prior import SemanticsPrior, sample_prior


def prior_scheduler() -> DDIMScheduler:
    """The prior's noise schedule: recompose's default betas, predicting x_0, no clipping."""
    from pipelines.diffusion.schedulers import default_scheduler

    return DDIMScheduler.from_config(
        default_scheduler().config, prediction_type="sample", clip_sample=False, set_alpha_to_one=False
    )


class PriorPipeline(DiffusionPipeline):
    def __init__(self, prior: SemanticsPrior, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(prior=prior, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> PriorPipeline:
        if kwargs.setdefault("use_safetensors", True) is not True:
            raise ValueError("PriorPipeline loads safetensors weights only")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        if kwargs.setdefault("safe_serialization", True) is not True:
            raise ValueError("PriorPipeline saves safetensors weights only")
        super().save_pretrained(save_directory, **kwargs)

    def encode(self, captions: Sequence[str] | Mapping[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions as text (a trainable caption encoder) or as the decomposition's caption
        embeddings (``{"caption.clip_sentence": (B, W), "caption.clip_tokens": (B, L, W), …}``)."""
        from pipelines.diffusion.inputs import join_tokens

        p = self.prior
        if p.config.caption_encoder == "trainable":
            if isinstance(captions, Mapping):
                raise ValueError("this prior's captions are text: give a list of captions")
            return p.encode_caption(text_ids=p.tokenize([str(c) for c in captions]))
        if not isinstance(captions, Mapping):
            raise ValueError(f"this prior takes {p.config.caption_encoder} caption embeddings, not text")
        keys = p.config.caption_encoder.split("+")
        missing = [
            f"caption.{k}_{part}"
            for k in keys
            for part in ("sentence", "tokens")
            if f"caption.{k}_{part}" not in captions
        ]
        if missing:
            raise ValueError(f"the prior needs the caption embeddings {missing}")
        sentence = np.concatenate(
            [np.asarray(captions[f"caption.{k}_sentence"], np.float32) for k in keys], -1
        )
        tokens = join_tokens([np.asarray(captions[f"caption.{k}_tokens"], np.float32) for k in keys])
        return p.encode_caption(
            sentence=torch.from_numpy(sentence).to(p.device), tokens=torch.from_numpy(tokens).to(p.device)
        )

    @torch.no_grad()
    def __call__(
        self,
        captions: Sequence[str] | Mapping[str, np.ndarray],
        guidance: float = 4.0,
        num_inference_steps: int = 50,
        seed: int = 0,
    ) -> np.ndarray:
        """(B, D) float32 semantics embeddings, one per caption (rows of embeddings), seeded."""
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        was = self.prior.training
        self.prior.eval()
        try:
            caption = self.encode(captions)
            g = torch.Generator().manual_seed(seed)
            out = sample_prior(self.prior, self.scheduler, caption, guidance, num_inference_steps, g)
        finally:
            self.prior.train(was)
        return out.float().cpu().numpy()
