"""``SemanticsPrior`` and ``PriorPipeline`` on both kinds of semantics: the embedded default's
(trainable captions, the base's image encoder as the target) and CLIP's (caption embeddings in,
CLIP image embeddings out): it learns caption -> embedding pairs, samples them back with guidance,
and saves and loads as safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.prior import SemanticsPrior, prior_loss
from pipelines.diffusion.prior import PriorPipeline, prior_scheduler

TEXTS = ["a red circle", "a blue star", "a green square", "a yellow triangle"]


def _fit(prior: SemanticsPrior, captions, target: torch.Tensor, steps: int = 150) -> list[float]:
    pipe = PriorPipeline(prior, prior_scheduler())
    prior.set_normalization(target.mean(0), target.std(0))
    opt = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], 2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        caption = pipe.encode(captions)
        keep = torch.rand(len(target), generator=g) >= 0.1
        loss = prior_loss(prior, pipe.scheduler, prior.normalize(target), caption, keep, g).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _targets(n: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


@pytest.mark.parametrize("kind", ["trainable", "clip"])
def test_the_prior_learns_caption_to_embedding_pairs(kind, tmp_path):
    torch.manual_seed(0)
    dim = 8 if kind == "trainable" else 12
    target = _targets(4, dim)
    if kind == "trainable":
        prior = SemanticsPrior(embedding_dim=dim, image_encoder_bottleneck=dim, width=64, layers=2)
        captions = TEXTS
    else:
        prior = SemanticsPrior(
            embedding_dim=dim, caption_encoder="clip", caption_sentence_dim=16, caption_token_dim=16,
            caption_length=5, width=64, layers=2,
        )  # fmt: skip
        g = torch.Generator().manual_seed(2)
        captions = {
            "caption.clip_sentence": torch.randn(4, 16, generator=g).numpy(),
            "caption.clip_tokens": torch.randn(4, 5, 16, generator=g).numpy(),
        }
    losses = _fit(prior, captions, target)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    pipe = PriorPipeline(prior.eval(), prior_scheduler())
    pipe.save_pretrained(str(tmp_path / "prior"))
    assert sorted(p.name for p in (tmp_path / "prior" / "prior").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = PriorPipeline.from_pretrained(str(tmp_path / "prior"))
    sampled = loaded(captions, guidance=2.0, num_inference_steps=20, seed=3)
    assert sampled.shape == (4, dim) and np.allclose(np.linalg.norm(sampled, axis=1), 1, atol=1e-4)
    cosine = (sampled * target.numpy()).sum(1)
    assert cosine.min() > 0.8, cosine  # each caption's sample is its own embedding
    assert np.array_equal(sampled, loaded(captions, guidance=2.0, num_inference_steps=20, seed=3))


def test_the_prior_refuses_inputs_of_the_other_kind():
    text = PriorPipeline(SemanticsPrior(embedding_dim=8, width=32, layers=1), prior_scheduler())
    with pytest.raises(ValueError, match="captions are text"):
        text({"caption.clip_sentence": np.zeros((1, 64), np.float32)})
    clip = PriorPipeline(
        SemanticsPrior(embedding_dim=8, caption_encoder="clip", width=32, layers=1), prior_scheduler()
    )
    with pytest.raises(ValueError, match="takes clip caption embeddings, not text"):
        clip(["a red circle"])
    with pytest.raises(ValueError, match=r"needs the caption embeddings \['caption.clip_tokens'\]"):
        clip({"caption.clip_sentence": np.zeros((1, 64), np.float32)})
    with pytest.raises(ValueError, match="learns CLIP embeddings"):
        clip.prior.embed_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="safetensors"):
        PriorPipeline.from_pretrained("/nonexistent", use_safetensors=False)
