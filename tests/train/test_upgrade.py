"""A run's checkpoints decide the model it resumes with when a preset gained an argument since."""

from __future__ import annotations

import json

from models import ComposerModel, preset_config
from models.prior import SemanticsPrior
from pipelines.train.run import as_checkpointed


def _checkpoint(run_dir, name: str, config: dict) -> None:
    model = run_dir / name / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))


def test_an_argument_the_checkpoints_lack_takes_its_old_default(tmp_path):
    kwargs = preset_config("tiny", sample_size=32)
    assert kwargs["text_kernel"] == 3
    assert as_checkpointed(tmp_path, kwargs, ComposerModel) == kwargs  # no checkpoint: a new run

    saved = {k: v for k, v in kwargs.items() if k != "text_kernel"}
    _checkpoint(tmp_path, "checkpoint_2026-12-01_10-00-00.0", saved)
    resumed = as_checkpointed(tmp_path, kwargs, ComposerModel)
    assert resumed == {**kwargs, "text_kernel": 1}
    # the resumed model holds exactly the weights such a checkpoint has
    old = ComposerModel(**resumed).state_dict()
    assert not any("neighbours" in k for k in old)
    assert set(old) == set(ComposerModel(**{**kwargs, "text_kernel": 1}).state_dict())


def test_a_checkpoint_with_the_argument_keeps_it(tmp_path):
    kwargs = preset_config("tiny", sample_size=32)
    _checkpoint(tmp_path, "checkpoint_2026-12-05_10-00-00.0", kwargs)
    assert as_checkpointed(tmp_path, kwargs, ComposerModel) == kwargs


def test_the_prior_too(tmp_path):
    kwargs = {"text_kernel": 3, "width": 64}
    _checkpoint(tmp_path, "checkpoint_1", {"width": 64})
    assert as_checkpointed(tmp_path, kwargs, SemanticsPrior) == {"text_kernel": 1, "width": 64}
