from __future__ import annotations

import pytest

from pipelines.config import ConfigError, config_hash, flatten, load_config, parse_overrides
from pipelines.decompose import DecomposeConfig


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
        ("resolution=big", "expected an integer"),
        ("sketch.method=sobel", "not one of"),
        ("nosuch=1", "unknown config key"),
        ("sketch.nosuch=1", r"unknown config key\(s\) sketch.nosuch"),
        ("resolution", "expects key=value"),
        ("shard_size=0", "shard_size must be >= 1"),
        ("sketch.low_threshold=300", "low"),
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
