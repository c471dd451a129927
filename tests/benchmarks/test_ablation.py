"""benchmarks/ablation.py: a variant's JSON becomes the training job's --set overrides, and an
evaluation's summary becomes its table row. (Its runs are the project's own jobs, tested
end to end in tests/train and tests/evaluate.)"""

from __future__ import annotations

from pathlib import Path

from benchmarks import ablation
from pipelines.config import load_config
from pipelines.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_a_variant_becomes_set_overrides_the_config_takes():
    variant = {
        "model": {"prediction": "v_prediction", "overrides": {"attention_head_dim": 32}},
        "optim": {"loss_weighting": "min_snr", "lr": 0.001},
        "dropout": {"per_condition": {"caption": 0.3, "palette": 0.3}},
    }
    sets = ablation.flat_sets(variant)
    assert "optim.lr=0.001" in sets and 'model.prediction="v_prediction"' in sets
    cfg = load_config(TrainConfig, ROOT / "configs/train-laptop.yaml", {"data": "d", "output": "o"}, sets)
    assert cfg.model.prediction == "v_prediction" and cfg.optim.loss_weighting == "min_snr"
    assert cfg.optim.lr == 0.001 and cfg.model.overrides == {"attention_head_dim": 32}
    assert cfg.dropout.per_condition == {"caption": 0.3, "palette": 0.3}


def test_summary_reads_the_quality_bar_and_the_benchmark():
    evaluation = {
        "quality_bar": [
            {"condition": "palette", "metric": "palette.chi2", "ratio": 0.5, "value": 0.4},
            {"condition": "mask (all)", "metric": "mask.max_abs_diff", "ratio": None, "value": 0.0},
            {"condition": "caption (seen pairs)", "metric": "benchmark.colour", "ratio": None, "value": 0.6},
        ],
        "metrics": {"caption/seen/colour": 0.6, "caption/heldout/shape": 0.2},
    }
    row = ablation.summary(evaluation)
    assert row["palette"] == 0.5 and row["sketch"] is None and row["mask max |Δ|"] == 0.0
    assert row["caption/seen/colour"] == 0.6 and row["caption/heldout/shape"] == 0.2
