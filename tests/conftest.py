from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models import ConditionDropout, build_model
from models.objective import diffusion_loss
from pipelines.data.scene import render_sample
from pipelines.diffusion.inputs import image_to_tensor, to_conditions
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.schedulers import default_scheduler
from tests.helpers import block_network

# No test may touch the network: every hub lookup must be answered from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for a test module (starting Ray costs seconds), stopped at the module's end so
    that the modules which start a Ray of their own (Serve's, the evaluation's) never find one
    running, whatever order the modules run in."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Refuse (and record) every connection and name lookup; an empty, offline HF cache.

    Tests that load weights assert the returned list stays empty.
    """
    import huggingface_hub.constants as hf_constants

    attempts = block_network(monkeypatch)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return attempts


TRAINED_RESOLUTION = 32


@pytest.fixture(scope="session")
def trained_tiny() -> ComposerPipeline:
    """The tiny preset trained briefly (48 steps, ~30 s on one core) on 16 synthetic images.

    A random-init UNet's noise prediction changes so abruptly with x_t that DDIM inversion
    cannot be undone (PSNR ~5 dB); a little training makes it smooth enough to test inversion.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    r = TRAINED_RESOLUTION
    samples = [render_sample(0, "train", i, r) for i in range(16)]
    images = np.stack([s.image for s in samples])
    texts = np.array([s.caption for s in samples], object)
    intensity = images.mean(-1).astype(np.uint8)
    model = build_model("tiny", sample_size=r)
    scheduler = default_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    dropout = ConditionDropout()
    available = torch.zeros(16, 8, dtype=torch.bool)
    available[:, [0, 1, 6]] = True  # caption, semantics, intensity
    for _ in range(48):
        idx = torch.randint(0, 16, (16,), generator=g).numpy()
        rows = {"text": texts[idx], "intensity": intensity[idx], "semantics.image": images[idx]}
        loss = diffusion_loss(
            model,
            scheduler,
            image_to_tensor(images[idx]),
            to_conditions(model, rows),
            dropout(available, g),
            g,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    pipe = ComposerPipeline(model.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.training_images = (images, texts, intensity)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved random-init tiny pipeline at 32 px (default decomposition settings: no depth
    weights, so depth cannot be decomposed) — what the Serve tests load."""
    torch.manual_seed(0)
    pipe = ComposerPipeline(build_model("tiny", sample_size=TRAINED_RESOLUTION).eval(), default_scheduler())
    out = tmp_path_factory.mktemp("serve-model") / "pipeline"
    pipe.save_pretrained(str(out))
    return str(out)
