"""Loading saved pipelines (pipelines/diffusion/loading.py): the shipped reference model by name,
float16 weights loaded back as float32, and a clear error for what is not a pipeline."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from pipelines.diffusion import loading
from pipelines.diffusion.loading import REFERENCE_MODEL, ModelError, load_pipeline, pipeline_dir
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.schedulers import default_scheduler


def _save(path, dtype=torch.float32) -> ComposerPipeline:
    torch.manual_seed(0)
    pipe = ComposerPipeline(build_model("tiny", sample_size=16).eval(), default_scheduler("v_prediction"))
    pipe.unet.to(dtype)
    pipe.save_pretrained(str(path))
    return pipe


def test_float16_weights_load_as_float32_with_the_saved_prediction_type(tmp_path):
    saved = _save(tmp_path / "half", torch.float16)
    pipe = load_pipeline(str(tmp_path / "half"), "cpu")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for (k, a), b in zip(saved.unet.state_dict().items(), pipe.unet.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b), k  # float16 -> float32 is exact


def test_the_reference_name_resolves_to_the_shipped_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "REFERENCE_DIR", tmp_path / "reference")
    with pytest.raises(ModelError, match="no reference model"):
        pipeline_dir(REFERENCE_MODEL)
    _save(tmp_path / "reference")
    assert pipeline_dir(REFERENCE_MODEL) == tmp_path / "reference"
    assert load_pipeline(REFERENCE_MODEL, "cpu").unet.config.sample_size == 16


def test_the_shipped_reference_model_loads():
    if not (loading.REFERENCE_DIR / "model_index.json").is_file():
        pytest.fail(f"the reference model is missing from {loading.REFERENCE_DIR}")
    pipe = load_pipeline(REFERENCE_MODEL, "cpu")
    assert pipe.unet.text_encoder is not None  # the embedded default: no weights to download
    assert (loading.REFERENCE_DIR / "README.md").is_file()
    size = sum(f.stat().st_size for f in (loading.REFERENCE_DIR / "unet").iterdir())
    assert size <= 20e6


def test_not_a_pipeline_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        pipeline_dir(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        pipeline_dir(str(tmp_path / "empty"))
