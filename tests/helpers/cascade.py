"""Tiny random cascades for tests: a 16 px base and a 16→32 upsampler, saved and assembled."""

from __future__ import annotations

from pathlib import Path

DECOMPOSE = {"sketch": {"method": "canny"}, "instances": {"method": "cluster"}}


def save_stage(
    directory: Path, preset: str, side: int, factor: int = 1, decompose: dict | None = None
) -> Path:
    """A random-init ``ComposerPipeline`` of ``preset`` at ``side`` px (an upsampler when factor > 1)."""
    import torch

    from models import build_model
    from pipelines.diffusion.pipeline import ComposerPipeline
    from pipelines.diffusion.schedulers import default_scheduler

    torch.manual_seed(0)
    model = build_model(preset, sample_size=side, upsample_factor=factor).eval()
    pipe = ComposerPipeline(
        model, default_scheduler(), decompose=DECOMPOSE if decompose is None else decompose
    )
    pipe.save_pretrained(str(directory))
    return directory


def save_prior(directory: Path, embedding_dim: int = 8) -> Path:
    """A random-init ``PriorPipeline`` for the tiny preset's trainable semantics (8-d)."""
    import torch

    from models.prior import SemanticsPrior
    from pipelines.diffusion.prior import PriorPipeline, prior_scheduler

    torch.manual_seed(0)
    prior = SemanticsPrior(
        embedding_dim=embedding_dim, image_encoder_bottleneck=embedding_dim, width=32, layers=1
    )
    PriorPipeline(prior.eval(), prior_scheduler()).save_pretrained(str(directory))
    return directory


def make_cascade(
    root: Path, base: int = 16, side: int = 32, prior: bool = False, ensemble_base: bool = False
) -> Path:
    """``root``/cascade: a ``base`` px tiny base and a ×(side/base) upsampler-tiny (and a prior);
    ``ensemble_base``: the base is an ensemble of two experts with the same weights (its samples
    are the single base's)."""
    import shutil

    from pipelines.diffusion.cascade import assemble
    from pipelines.diffusion.ensemble import assemble as assemble_ensemble
    from pipelines.diffusion.ensemble import write_expert

    b = save_stage(root / "base", "tiny", base)
    if ensemble_base:
        shutil.copytree(b, root / "low")
        write_expert(root / "low", (0, 500), str(b))
        b = root / "base-ensemble"
        assemble_ensemble([str(root / "base"), str(root / "low")], [None, None], b, Path)
    u = save_stage(root / "upsampler", "upsampler-tiny", side, side // base)
    p = str(save_prior(root / "prior")) if prior else None
    assemble(str(b), [str(u)], root / "cascade", Path, p)
    return root / "cascade"
