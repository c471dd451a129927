"""``benchmarks/tiny_latent_base.py``: the smoke build loads as a ``--base``, its VAE's scaling factor
comes from its latents, a rerun skips every stage, and a killed training continues exactly."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from benchmarks import tiny_latent_base as tlb
from pipelines.conditions.backbone import load_base, vae_identity


def _main(argv: list[str]) -> tuple[int, dict]:
    out, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            code = tlb.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets it for the whole process
    return code, json.loads(out.getvalue()) if code == 0 else {}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("tiny-base")
    code, summary = _main(["--smoke", "--output", str(out)])
    assert code == 0
    return out, summary


@pytest.mark.slow
def test_smoke_build_is_a_base(smoke):
    out, summary = smoke
    assert summary["skipped"] == [] and list(tlb.STAGES) == [k for k in summary if k in tlb.STAGES]
    base = load_base(out)
    assert type(base.unet).__name__ == "UNet2DConditionModel"
    assert type(base.vae).__name__ == "AutoencoderKL" and base.vae_scale_factor == tlb.VAE_FACTOR
    assert type(base.text_encoder).__name__ == "CLIPTextModel"
    assert type(base.scheduler).__name__ == "DDIMScheduler"
    sched = base.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.clip_sample, sched.set_alpha_to_one, sched.steps_offset) == (False, False, 1)
    assert base.unet.config.sample_size * tlb.VAE_FACTOR == summary["settings"]["resolution"] == 32
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    # Every caption of the grammar fits the context, one token per word.
    assert base.tokenizer.model_max_length == tlb.MAX_LENGTH >= summary["text"]["longest_pool_caption"]
    tokens, _ = base.encode_text(["a red star on a blue background", ""])
    assert tokens.shape == (2, tlb.MAX_LENGTH, 64) and not torch.allclose(tokens[0], tokens[1])
    assert (out / "samples.png").is_file()


@pytest.mark.slow
def test_scaling_factor_from_the_latents(smoke):
    out, summary = smoke
    scaling = vae_identity(out)["scaling_factor"]
    assert scaling == pytest.approx(summary["vae"]["scaling_factor"])
    assert scaling != 0.18215  # not SD's (AutoencoderKL's default)
    latents = np.load(out / "build" / "latents.npy")  # the pool's posterior means, unscaled
    assert scaling == pytest.approx(1 / latents.std(), rel=1e-3)
    assert np.isfinite(summary["vae"]["heldout_psnr_db"])


@pytest.mark.slow
def test_rerun_skips_every_stage(smoke):
    out, first = smoke
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    code, again = _main(["--smoke", "--output", str(out)])
    assert code == 0 and again["skipped"] == list(tlb.STAGES)
    assert weights.stat().st_mtime_ns == mtime
    assert {k: again[k] for k in tlb.STAGES} == {k: first[k] for k in tlb.STAGES}
    # Other settings in the same directory are refused, not silently mixed.
    assert _main(["--smoke", "--unet-steps", "3", "--output", str(out)])[0] == 2


def test_killed_training_continues_exactly(tmp_path):
    """Two steps, killed, then resumed to four = four unbroken steps (weights, AdamW, EMA)."""
    from diffusers.training_utils import EMAModel

    s = tlb.Settings(warmup_steps=2, checkpoint_every=2)
    data = torch.randn(64, 3)

    def run(steps: int, ckpt: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        ema = EMAModel(model.parameters(), decay=0.9)

        def loss(g: torch.Generator) -> torch.Tensor:
            x = data[torch.randint(64, (4,), generator=g)]
            return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()

        tlb.train("test", model, loss, steps, 0.1, s, tmp_path / ckpt, ema)
        ema.copy_to(model.parameters())
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    unbroken = run(4, "a.pt")
    run(2, "b.pt")  # the "killed" run: its last checkpoint is at step 2
    assert torch.equal(run(4, "b.pt"), unbroken)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
