"""Every registered extractor passes the contract, configured the way the job configures it."""

from __future__ import annotations

import pytest

from models import CONDITIONS
from pipelines.conditions import (
    CONDITION_NAMES,
    EXTRACTED_NAMES,
    EXTRAS,
    MAPS,
    REGISTRY,
    STORED_NAMES,
    get_extractor,
)
from pipelines.config import load_config
from pipelines.decompose.config import DecomposeConfig
from tests.conditions.contract import assert_contract, make_batch


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random-init models in the real formats, for the extractors that need weights."""
    from tests.helpers.tiny_clip import make_tiny_open_clip

    d = tmp_path_factory.mktemp("weights")
    clip = make_tiny_open_clip(d / "clip")
    return {"caption.clip_model": clip, "semantics.clip_model": clip}


def test_one_extractor_per_condition_in_the_models_order():
    # The names themselves are the on-disk format: tests/decompose/test_legacy.py resumes shards
    # an earlier release wrote under them.
    assert CONDITION_NAMES == CONDITIONS and all(REGISTRY[n].name == n for n in CONDITIONS)
    assert EXTRACTED_NAMES == CONDITION_NAMES[:-1]
    assert set(MAPS) < set(EXTRACTED_NAMES)
    assert (
        REGISTRY["mask"].extracted is False
        and REGISTRY["mask"](REGISTRY["mask"].config_cls(), 32).columns() == []
    )


def test_other_representations_are_stored_but_are_not_conditions():
    # `latents` (tests/conditions/test_latents.py) has no presence column in the model.
    assert set(EXTRAS) == {"latents"} and not set(EXTRAS) & set(CONDITIONS)
    assert STORED_NAMES == EXTRACTED_NAMES + ("latents",)
    assert all(get_extractor(n) is cls and cls.name == n and cls.extracted for n, cls in EXTRAS.items())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="known conditions: caption, semantics.*other representations: latents"
    ):
        get_extractor("colour")


@pytest.mark.parametrize("name", EXTRACTED_NAMES)
def test_every_extractor_meets_the_contract(name, weights):
    cfg = load_config(DecomposeConfig, values={"input": "x", "output": "y", **weights})
    cls = get_extractor(name)
    ext = cls(getattr(cfg, name), 32, has_ground_truth=True)
    assert ext.name == name and ext.version and ext.unavailable_reason() is None
    assert isinstance(ext.config, cls.config_cls)
    assert 0 <= ext.resources()["num_gpus"]
    tol = 2e-3 if name in ("caption", "semantics") else 0.0
    assert_contract(ext, make_batch(3, 32, with_gt=True), atol=tol)
