"""``recompose decompose --base``: latents and the base's caption embeddings, on a tiny SD."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from pipelines.conditions.backbone import BaseModelError, load_base, vae_identity
from pipelines.config import ConfigError, config_hash, load_config
from pipelines.data.shards import read_shard
from pipelines.data.synth import write_synth
from pipelines.decompose import job as decompose_job
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.execute import fit_to_cluster
from pipelines.decompose.job import run_decompose
from pipelines.decompose.plan import JobPlan
from tests.helpers.tiny_sd import make_tiny_sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    write_synth(out, count=6, resolution=32, seed=0, split="train", progress=False)
    return out


def cfg(inp, out, base=None, conditions="caption", **kw) -> DecomposeConfig:
    values = {"input": str(inp), "output": str(out), "conditions": conditions, "resolution": 32}
    values.update(progress=False, base=base, **kw)
    return load_config(DecomposeConfig, values=values)


def test_base_fills_the_sections_and_defaults_the_caption_encoders():
    plain = cfg("in", "out")
    assert plain.wanted() == ("caption",) and plain.caption.encoders == ("clip",)
    c = cfg("in", "out", base="/sd")
    assert c.wanted() == ("caption", "latents") and c.latents.base == c.caption.base == "/sd"
    assert c.caption.encoders == ("base",)
    assert cfg("in", "out", base="/sd", **{"caption.clip_model": "local-dir:/c"}).caption.encoders == (
        "clip",
        "base",
    )
    explicit = cfg("in", "out", base="/sd", **{"caption.encoders": "clip"})
    assert explicit.caption.encoders == ("clip",)
    assert config_hash(c) != config_hash(plain) == config_hash(cfg("in", "out", base=None))
    assert cfg("in", "out", base="/sd", conditions="").wanted()[-1] == "latents"


def test_latents_without_base_and_a_section_base_are_refused():
    with pytest.raises(ConfigError, match="no base is given; give --base"):
        cfg("in", "out", conditions="latents")
    with pytest.raises(ConfigError, match="latents.base is filled in from base"):
        cfg("in", "out", **{"latents.base": "/sd"})
    with pytest.raises(ConfigError, match="caption.base is filled in from base"):
        cfg("in", "out", base="/a", **{"caption.base": "/b"})


def test_bad_resolution_or_base_is_refused_before_any_work(sd, synth, tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray work started")

    monkeypatch.setattr(decompose_job, "execute", no_ray)
    with pytest.raises(ConfigError, match="not a multiple of the VAE's scale factor 4"):
        run_decompose(cfg(synth, tmp_path / "a", sd, resolution=30))
    with pytest.raises(ConfigError, match="--base /no/such/sd: neither a local directory"):
        run_decompose(cfg(synth, tmp_path / "b", "/no/such/sd"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    broken = shutil.copytree(sd, tmp_path / "broken")
    next((broken / "vae").glob("*.safetensors")).write_bytes(b"not safetensors")
    with pytest.raises(BaseModelError, match="could not load vae/"):
        run_decompose(cfg(synth, tmp_path / "c", str(broken)))


def test_latents_take_the_gpus_the_cluster_has_left():
    def stage(gpus, concurrency=1):
        return {"batch_size": 8, "concurrency": concurrency, "num_cpus": 1.0, "num_gpus": gpus}

    got = fit_to_cluster({"depth": stage(0.5), "latents": stage(None, 2)}, {"CPU": 16, "GPU": 2})
    assert got["latents"]["num_gpus"] == 0.75 and got["depth"]["num_gpus"] == 0.5
    assert fit_to_cluster({"latents": stage(None)}, {"CPU": 16, "GPU": 8})["latents"]["num_gpus"] == 1.0
    assert fit_to_cluster({"latents": stage(None)}, {"CPU": 16})["latents"]["num_gpus"] == 0.0


def _direct_latents(sd: str, images: np.ndarray) -> np.ndarray:
    import torch

    vae = load_base(sd, ("vae",)).vae
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean.numpy().astype(np.float16)


@pytest.mark.slow
def test_job_writes_latents_and_base_captions_and_resumes_by_the_weights(sd, synth, tmp_path, ray_local):
    out = tmp_path / "out"
    s = run_decompose(cfg(synth, out, sd, write_webdataset=True))
    assert (s.rows, s.errors, s.computed) == (6, 0, {"caption": 6, "latents": 6})
    man = json.loads((out / "manifest.json").read_text())
    assert man["extractors"]["latents"]["vae"] == vae_identity(sd)
    assert man["extractors"]["latents"]["base"] == sd and man["extractors"]["caption"]["base"] == sd
    shard = out / man["shards"][0]["path"]
    d = read_shard(shard)
    assert d["latents"].dtype == np.float16 and d["latents"].shape == (6, 4, 8, 8)
    np.testing.assert_allclose(
        d["latents"].astype(np.float32), _direct_latents(sd, d["image"]).astype(np.float32), atol=2e-3
    )
    tokens, sentence = load_base(sd, ("text_encoder", "tokenizer")).encode_text(list(d["text"]))
    assert d["caption.base_tokens"].shape == (6, 16, 32) and d["caption.base_sentence"].shape == (6, 32)
    np.testing.assert_allclose(d["caption.base_sentence"], sentence.numpy(), atol=2e-3)
    with tarfile.open(shard.with_suffix(".tar")) as tf:
        member = tf.extractfile(f"{d['key'][0]}.latents.npy")
        np.testing.assert_array_equal(np.load(io.BytesIO(member.read())), d["latents"][0])

    # The same base, or the same weights elsewhere: nothing to compute.
    assert run_decompose(cfg(synth, out, sd)).computed == {}
    moved = shutil.copytree(sd, tmp_path / "moved")
    assert run_decompose(cfg(synth, out, str(moved))).shards_computed == 0

    # Another base: its two columns are computed again and merged into the shards (the merge
    # itself is the one tests/decompose/test_job.py runs after a version bump).
    other = make_tiny_sd(tmp_path / "other", seed=1)
    job = JobPlan(cfg(synth, out, other))
    assert [(p.todo, p.fresh) for p in job.pending()] == [(("caption", "latents"), False)]
    assert (
        job.extractors["latents"].describe()["vae"]["sha256"] != man["extractors"]["latents"]["vae"]["sha256"]
    )
