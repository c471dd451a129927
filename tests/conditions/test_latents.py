"""``latents``: a tiny Stable Diffusion's VAE (tests/helpers/tiny_sd.py), loaded from disk."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipelines.conditions.backbone import load_base, vae_identity
from pipelines.conditions.latents import LatentsConfig, LatentsExtractor
from tests.conditions.contract import assert_contract, make_batch
from tests.helpers import block_network
from tests.helpers.tiny_sd import make_tiny_sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    block_network(monkeypatch)


def _extractor(base: str | None, resolution: int = 32) -> LatentsExtractor:
    return LatentsExtractor(LatentsConfig(base=base), resolution)


def test_contract_and_shape(sd):
    ex = _extractor(sd)
    assert ex.unavailable_reason() is None
    assert [(s.name, s.dtype, s.shape) for s in ex.columns()] == [("latents", "float16", (4, 8, 8))]
    assert_contract(ex, make_batch(3, 32), atol=2e-3)


def test_equals_the_vae_latent_mean(sd):
    import torch

    batch = make_batch(2, 32)
    out = _extractor(sd)(batch)["latents"]
    vae = load_base(sd, ("vae",)).vae
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean.numpy().astype(np.float16)
    np.testing.assert_array_equal(out, ref)


def test_manifest_entry_names_the_base_and_its_vae(sd):
    d = _extractor(sd).describe()
    assert d["base"] == sd and d["vae"] == vae_identity(sd)
    assert d["vae"]["scale_factor"] == 4 and d["vae"]["latent_channels"] == 4


def test_fingerprint_follows_the_vae_weights_not_the_path(sd, tmp_path):
    from safetensors.torch import load_file, save_file

    moved = shutil.copytree(sd, tmp_path / "moved")
    assert _extractor(str(moved)).fingerprint() == _extractor(sd).fingerprint()
    weights = next((moved / "vae").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors = {k: v + 1e-3 if i == 0 else v for i, (k, v) in enumerate(tensors.items())}
    save_file(tensors, weights, metadata={"format": "pt"})
    assert _extractor(str(moved)).fingerprint() != _extractor(sd).fingerprint()
    assert _extractor(sd, 64).fingerprint() != _extractor(sd).fingerprint()


@pytest.mark.parametrize(
    ("base", "resolution", "reason"),
    [
        (None, 32, "no base is given; give --base"),
        ("SD", 30, "resolution 30 is not a multiple of the VAE's scale factor 4 .*--resolution 32"),
        ("/no/such/dir", 32, "--base /no/such/dir: neither a local directory nor a repo"),
    ],
)
def test_unavailable_says_why(sd, base, resolution, reason):
    ex = _extractor(sd if base == "SD" else base, resolution)
    assert ex.unavailable_reason() is not None
    with pytest.raises(Exception, match=reason):
        ex.prepare()
