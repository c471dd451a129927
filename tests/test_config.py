from __future__ import annotations

import pytest

from pipelines.config import ConfigError, config_hash, flatten, load_config, parse_overrides, to_dict
from pipelines.decompose.config import DecomposeConfig


def test_yaml_then_values_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("resolution: 128\nsketch: {method: canny, low_threshold: 10}\ncaption: {encoders: [clip]}\n")
    cfg = load_config(
        DecomposeConfig,
        f,
        values={"input": "in", "output": "out", "resolution": None, "sketch.high_threshold": 50},
        overrides=["sketch.low_threshold=20", "caption.encoders=[clip, t5]", "conditions=palette,sketch"],
    )
    assert cfg.resolution == 128  # None values do not override the file
    assert (cfg.sketch.low_threshold, cfg.sketch.high_threshold) == (20, 50)
    assert cfg.caption.encoders == ("clip", "t5")
    assert cfg.conditions == ("palette", "sketch")
    with pytest.raises(Exception):  # noqa: B017 - frozen
        cfg.resolution = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resolution=big", "resolution: Input should be a valid integer"),
        ("sketch.method=sobel", "sketch.method: Input should be 'canny', 'pidinet' or 'hed'"),
        ("nosuch=1", "unknown config key nosuch; known: .*shard_size"),
        ("sketch.nosuch=1", "unknown config key sketch.nosuch; known: .*high_threshold"),
        ("resolution", "expects key=value"),
        ("shard_size=0", "shard_size: Input should be greater than or equal to 1"),
        ("resolution=4", "resolution: Input should be greater than or equal to 8"),
        ("sketch.low_threshold=300", "sketch.low_threshold: Input should be less than or equal to 255"),
        (
            "sketch.high_threshold=50",
            "sketch: canny thresholds must satisfy 0 <= low_threshold <= high_threshold",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DecomposeConfig, overrides=[override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DecomposeConfig, tmp_path / "nope.yaml")


def test_hash_ignores_resources_only():
    base = load_config(DecomposeConfig, values={"input": "a"})
    scaled = load_config(
        DecomposeConfig,
        values={"input": "a", "output": "elsewhere"},
        overrides=["sketch.batch_size=7", "palette.concurrency=4", "depth.num_gpus=0.5"],
    )
    changed = load_config(DecomposeConfig, values={"input": "a"}, overrides=["sketch.low_threshold=5"])
    assert config_hash(base) == config_hash(scaled) != config_hash(changed)


def test_flatten_and_overrides_parse():
    flat = flatten(load_config(DecomposeConfig))
    assert flat["sketch.method"] == "canny" and flat["decode.max_pixels"] > 0
    assert parse_overrides(["a.b=1", "c=[x, y]", "d="]) == {"a.b": 1, "c": ["x", "y"], "d": ""}


def test_example_configs_load():
    for name in ("configs/decompose-laptop.yaml", "configs/decompose-gpu-cluster.yaml"):
        cfg = load_config(DecomposeConfig, name, values={"input": "in", "output": "out"})
        assert cfg.resolution >= 64


# The config hashes (and extractor fingerprints) that outputs written by earlier versions recorded,
# computed with the dataclass configs those versions had: a change here would make every existing
# decomposition recompute and every training run refuse to resume.
EARLIER_HASHES = {
    "decompose-default": "e1703724b8a83f2d",
    "decompose-default/base": "44303feb4c258473",
    "decompose-default/caption": "caption@1:3ccad995a21c",
    "decompose-default/depth": "depth@1:b5a08067900d",
    "decompose-default/instances": "instances@1:98b117d7efda",
    "decompose-default/intensity": "intensity@1:ee46ce9cb625",
    "decompose-default/palette": "palette@1:26f3a5c5a123",
    "decompose-default/semantics": "semantics@1:e1306d9c2abc",
    "decompose-default/sketch": "sketch@1:e0d34cf63ab5",
    "decompose-gpu-cluster": "6b853f0539f7efd0",
    "decompose-gpu-cluster/base": "6efddeee68ca0418",
    "decompose-gpu-cluster/caption": "caption@1:8096edf8ca6c",
    "decompose-gpu-cluster/depth": "depth@1:3c1345a95ed0",
    "decompose-gpu-cluster/instances": "instances@1:54a43a2e23b8",
    "decompose-gpu-cluster/intensity": "intensity@1:6dfafa4a7981",
    "decompose-gpu-cluster/palette": "palette@1:3e778cfb1855",
    "decompose-gpu-cluster/semantics": "semantics@1:95f66e3d3f18",
    "decompose-gpu-cluster/sketch": "sketch@1:4a9e5191673b",
    "decompose-laptop": "6f6bd5e16b01ed33",
    "decompose-laptop/base": "9ca49b5f189aa622",
    "decompose-laptop/caption": "caption@1:3ccad995a21c",
    "decompose-laptop/depth": "depth@1:b5a08067900d",
    "decompose-laptop/instances": "instances@1:98b117d7efda",
    "decompose-laptop/intensity": "intensity@1:ee46ce9cb625",
    "decompose-laptop/palette": "palette@1:26f3a5c5a123",
    "decompose-laptop/semantics": "semantics@1:e1306d9c2abc",
    "decompose-laptop/sketch": "sketch@1:e0d34cf63ab5",
    "decompose-overrides": "b41c90ecf1b07a02",
    "decompose-overrides/base": "061b3013cd1e74cf",
    "decompose-overrides/caption": "caption@1:2dd2bb65ee1c",
    "decompose-overrides/depth": "depth@1:6b64c33a8e2e",
    "decompose-overrides/instances": "instances@1:1da7d999b2ab",
    "decompose-overrides/intensity": "intensity@1:822addf4f7b4",
    "decompose-overrides/palette": "palette@1:1873f50ff3b1",
    "decompose-overrides/semantics": "semantics@1:29e25fb1de13",
    "decompose-overrides/sketch": "sketch@1:2f7c5f0d6da4",
    "evaluate-default": "d5d56e9c60f23a54",
    "evaluate-gpu-cluster": "679d635635efaad4",
    "serve-default": "b3bee9ad2f60924f",
    "serve-gpu-cluster": "23d56cf3400a933d",
    "train-default": "4b4fef5c11ca5e35",
    "train-gpu-cluster": "08b7984799d5225b",
    "train-laptop": "bd8f7a2c1bd9f93d",
    "train-laptop-vmin": "0587d41fb313a7df",
    "train-laptop-fast": "6bf4859941aadaab",
    "train-overrides": "eba9e2f7db0b4056",
    # The two reference configs changed (2026-12-04): they pin model.overrides text_kernel 1, the
    # shipped model's caption encoder, now that the presets set 3 (before: 0587d41fb313a7df,
    # the same as train-laptop-vmin, and 9a5d8ed8260b4cd4).
    "train-reference": "0c70837119c18dae",
    "train-reference-caption": "88ec0948a03ac033",
}


LAPTOP_BEFORE_VMIN = ["model.prediction=epsilon", "optim.loss_weighting=v"]
LAPTOP_2026_12_02 = "tests/data/configs/train-laptop-2026-12-02.yaml"  # before lr 2e-3 and 2 heads of 32


def _earlier_cases():
    from pipelines.evaluate.config import EvalConfig
    from pipelines.serve.config import ServeConfig
    from pipelines.train.config import TrainConfig

    io = {"input": "/data/in", "output": "/data/out"}
    run = {"data": "d", "output": "o"}
    return {
        "decompose-default": (DecomposeConfig, None, io, []),
        "decompose-laptop": (DecomposeConfig, "configs/decompose-laptop.yaml", io, []),
        "decompose-gpu-cluster": (DecomposeConfig, "configs/decompose-gpu-cluster.yaml", io, []),
        "decompose-overrides": (
            DecomposeConfig,
            None,
            io,
            ["conditions=palette,sketch", "resolution=32", "palette.sigma=7"],
        ),
        "train-default": (TrainConfig, None, run, []),
        # configs/train-laptop.yaml of those versions: ε target, v weighting (then v + Min-SNR-γ)
        "train-laptop": (TrainConfig, LAPTOP_2026_12_02, run, LAPTOP_BEFORE_VMIN),
        "train-laptop-vmin": (TrainConfig, LAPTOP_2026_12_02, run, []),  # then lr 2e-3 and 2 heads of 32
        "train-laptop-fast": (TrainConfig, "configs/train-laptop.yaml", run, []),  # the file as it is now
        "train-gpu-cluster": (TrainConfig, "configs/train-gpu-cluster.yaml", run, []),
        "train-reference": (TrainConfig, "configs/train-reference.yaml", run, []),
        "train-reference-caption": (TrainConfig, "configs/train-reference-caption.yaml", run, []),
        "train-overrides": (
            TrainConfig,
            LAPTOP_2026_12_02,
            run,
            [*LAPTOP_BEFORE_VMIN, "optim.lr=1e-4", "model.preset=small", "max_steps=10"],
        ),
        "evaluate-default": (EvalConfig, None, {"model": "m", **run}, []),
        "evaluate-gpu-cluster": (EvalConfig, "configs/evaluate-gpu-cluster.yaml", {"model": "m", **run}, []),
        "serve-default": (ServeConfig, None, {"model": "m"}, []),
        "serve-gpu-cluster": (ServeConfig, "configs/serve-gpu-cluster.yaml", {"model": "m"}, []),
    }


def test_hashes_match_earlier_versions():
    from pipelines.conditions import EXTRACTED_NAMES, get_extractor

    got = {}
    for name, (cls, path, values, overrides) in _earlier_cases().items():
        cfg = load_config(cls, path, values, overrides)
        got[name] = config_hash(cfg)
        if cls is DecomposeConfig:
            got[f"{name}/base"] = cfg.base_hash("folder")
            for n in EXTRACTED_NAMES:
                got[f"{name}/{n}"] = get_extractor(n)(getattr(cfg, n), cfg.resolution, True).fingerprint()
    assert got == EARLIER_HASHES


def test_an_added_field_is_hashed_only_off_its_default():
    from pipelines.train.config import TrainConfig

    base = load_config(TrainConfig, "configs/train-gpu-cluster.yaml")
    v = load_config(
        TrainConfig, "configs/train-gpu-cluster.yaml", overrides=["model.prediction=v_prediction"]
    )
    again = load_config(TrainConfig, "configs/train-gpu-cluster.yaml", overrides=["model.prediction=epsilon"])
    assert config_hash(v) != config_hash(base) == config_hash(again)
    assert "prediction" not in to_dict(base, outputs_only=True)["model"]
    assert to_dict(base)["model"]["prediction"] == "epsilon"  # still in the full config (MLflow params)


def test_the_timestep_spacing_is_saved_with_the_noise_schedule():
    """``model.timestep_spacing``: recompose's schedule takes it (leading unless set); a pretrained
    base keeps its own unless set; set, it is part of the config hash (it changes the export)."""
    from types import SimpleNamespace

    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import train_scheduler

    def spacing(overrides: list[str], base: dict | None = None) -> str:
        cfg = load_config(TrainConfig, "configs/train-laptop.yaml", overrides=overrides)
        args = SimpleNamespace(cfg=cfg, base=None if base is None else SimpleNamespace(scheduler=base))
        return train_scheduler(args).config.timestep_spacing

    trailing = ["model.timestep_spacing=trailing"]
    assert spacing([]) == "leading" and spacing(trailing) == "trailing"
    base = {"num_train_timesteps": 1000, "timestep_spacing": "trailing", "prediction_type": "epsilon"}
    assert spacing([], base) == "trailing"
    assert spacing(["model.timestep_spacing=leading"], base) == "leading"
    laptop = load_config(TrainConfig, "configs/train-laptop.yaml")
    assert config_hash(
        load_config(TrainConfig, "configs/train-laptop.yaml", overrides=trailing)
    ) != config_hash(laptop)
