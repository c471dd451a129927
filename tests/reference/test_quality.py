"""The quality regression test: the shipped reference model, evaluated by `recompose evaluate` on a
fixed small synthetic set, still steers by every condition.

Sampling only (about three minutes on the 2-core VM): the 16 images of `recompose synth --count 16
--seed 0` decomposed by the laptop config, 25 DDIM steps, guidance 3, the evaluation's defaults
otherwise, but without the caption benchmark, which no threshold here reads (see ``MEASURED``). Each threshold is
the reference model's measured value on exactly this set moved toward the unconditional floor by
``MARGIN`` of the distance between them (pipelines/diffusion/reference/README.md has the 64-row
table): a change to sampling, guidance, conditioning or the extractors that breaks composition
moves a value past it, while run-to-run noise (the figures are deterministic on one machine; BLAS
differs between machines) does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.data.synth import write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from pipelines.diffusion.loading import REFERENCE_MODEL
from pipelines.evaluate.config import BenchmarkConfig, EvalConfig
from pipelines.evaluate.run import run_evaluate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROWS = 16
MARGIN = 0.5  # of the distance from the measured value to the floor
# Measured on this set by the shipped model (2000 steps; its 64-row table is in its README):
# condition -> (value, floor). The caption benchmark is left out: the shipped model does not
# steer by the caption alone yet (on these 16 captions seen-pair colour 0.36 vs the floor's 0.33,
# shape 0.27 vs 0.30), so no threshold there could tell a break from noise.
MEASURED: dict[str, tuple[float, float]] = {
    "palette": (0.4025, 0.8093),
    "sketch": (0.5179, 0.2507),
    "instances": (0.4848, 0.1734),
    "depth": (0.1355, 0.2120),
    "intensity": (0.4171, 0.1629),
}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("reference-quality")
    write_synth(root / "synth", count=ROWS, resolution=64, seed=0, split="train", progress=False)
    values = {"input": str(root / "synth"), "output": str(root / "decomposed"), "progress": False}
    cfg = load_config(DecomposeConfig, ROOT / "configs/decompose-laptop.yaml", values)
    run_decompose(cfg)
    eval_cfg = EvalConfig(
        model=REFERENCE_MODEL,
        data=str(root / "decomposed"),
        output=str(root / "eval"),
        num_samples=ROWS,
        benchmark=BenchmarkConfig(enabled="off"),  # no threshold reads it: ~a third of the sampling
        progress=False,
    )
    result = run_evaluate(eval_cfg).to_dict()
    print(json.dumps({"quality_bar": result["quality_bar"]}, indent=1))
    return result


def _threshold(value: float, floor: float, lower_is_better: bool) -> float:
    return value + MARGIN * (floor - value) if lower_is_better else value - MARGIN * (value - floor)


def test_every_condition_still_steers_the_reference_model(evaluation):
    bar = {b["condition"]: b for b in evaluation["quality_bar"]}
    assert MEASURED, "no measured values recorded for the shipped reference model"
    for name, (value, floor) in MEASURED.items():
        lower = name in ("palette", "depth")
        limit = _threshold(value, floor, lower)
        got = bar[name]["value"]
        assert (got <= limit) if lower else (got >= limit), (name, got, limit, value, floor)
    masks = [b for b in evaluation["quality_bar"] if b["metric"] == "mask.max_abs_diff"]
    assert masks and all(b["value"] == 0 for b in masks)  # masked editing stays exact


def test_the_shipped_table_used_these_settings(evaluation):
    """The shipped evaluation (64 rows of the reference's own data) sampled as this one does: same
    seeds and settings, so the values above and the shipped table differ by their rows alone."""
    from pipelines.diffusion.loading import REFERENCE_DIR

    shipped = json.loads((REFERENCE_DIR / "evaluation" / "evaluate.json").read_text())
    measured = ("model", "seed", "steps", "guidance", "subsets", "mask_seed", "reextract")
    ours = json.loads(json.dumps(evaluation["config"]))  # tuples as lists, as evaluate.json has them
    assert {k: shipped["config"][k] for k in measured} == {k: ours[k] for k in measured}
    assert shipped["num_rows"] == 64 and evaluation["num_rows"] == ROWS
