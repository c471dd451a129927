"""The job with pretrained-model extractors (tiny random-init weights in the real formats) and synth data."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models import CONDITIONS
from pipelines.config import load_config
from pipelines.data.shards import read_shard
from pipelines.data.synth import render_sample, write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from tests.helpers import images


@pytest.mark.slow
def test_every_condition_through_ray_with_local_weights(tmp_path, ray_local):
    from tests.helpers.tiny_annotators import write_pidinet
    from tests.helpers.tiny_clip import make_tiny_open_clip
    from tests.helpers.tiny_depth import write_tiny_dpt
    from tests.helpers.tiny_segmentation import save_tiny_mask2former
    from tests.helpers.tiny_t5 import make_tiny_t5

    clip = make_tiny_open_clip(tmp_path / "clip")
    images.write_folder(tmp_path / "in", n_good=5, with_bad=False)
    values = {
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"),
        "resolution": 32,
        "progress": False,
        "write_webdataset": True,
        "caption.encoders": ["clip", "t5"],
        "caption.clip_model": clip,
        "caption.t5_model": make_tiny_t5(tmp_path / "t5"),
        "caption.t5_max_length": 12,
        "semantics.clip_model": clip,
        "sketch.method": "pidinet",
        "sketch.weights": str(write_pidinet(tmp_path / "annotators").parent),
        "sketch.detect_resolution": 64,
        "depth.weights": str(write_tiny_dpt(tmp_path / "dpt")),
        "instances.method": "model",
        "instances.weights": str(save_tiny_mask2former(tmp_path / "m2f")),
    }
    s = run_decompose(load_config(DecomposeConfig, values=values))
    assert (s.inputs, s.rows, s.errors) == (5, 5, 0)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(man["extractors"]) == set(CONDITIONS) - {"mask"}
    assert man["unavailable"] == {}
    shard = tmp_path / "out" / man["shards"][0]["path"]
    schema = pq.read_schema(shard)
    assert [f.name for f in schema.field("caption").type] == [
        "clip_sentence",
        "clip_tokens",
        "t5_sentence",
        "t5_tokens",
    ]
    d = read_shard(shard)
    assert d["caption.clip_tokens"].shape == (5, 77, 32) and d["caption.t5_tokens"].shape == (5, 12, 16)
    assert d["semantics"].dtype == np.float16 and d["depth"].shape == (5, 32, 32)
    # Different captions give different sentence embeddings (the text really went through).
    assert not np.array_equal(d["caption.clip_sentence"][0], d["caption.clip_sentence"][1])

    with tarfile.open(shard.with_suffix(".tar")) as tf:
        names = tf.getnames()
        assert "good00.image.png" in names and "good00.caption.clip_tokens.npy" in names
        arr = np.load(io.BytesIO(tf.extractfile("good00.semantics.npy").read()))
        np.testing.assert_array_equal(arr, d["semantics"][list(d["key"]).index("good00")])


@pytest.mark.slow
def test_synthetic_set_uses_its_ground_truth(tmp_path, ray_local):
    write_synth(tmp_path / "synth", count=12, resolution=64, seed=3, split="train", progress=False)
    cfg = load_config(
        DecomposeConfig,
        values={
            "input": str(tmp_path / "synth"),
            "output": str(tmp_path / "out"),
            "resolution": 32,
            "progress": False,
        },
    )
    s = run_decompose(cfg)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["input_format"] == "parquet" and s.rows == 12
    # No weights given: depth and instances come from the ground truth, caption/semantics say why not.
    assert set(man["extractors"]) == {"palette", "sketch", "instances", "depth", "intensity"}
    assert set(man["unavailable"]) == {"caption", "semantics"} and all(man["unavailable"].values())
    d = read_shard(tmp_path / "out" / man["shards"][0]["path"])
    for i, key in enumerate(d["key"]):
        gt = render_sample(3, "train", int(key.split("-")[1]), 64)
        assert d["text"][i] == gt.caption
        depth = np.asarray(Image.fromarray(gt.depth).resize((32, 32), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(d["depth"][i], depth)
        n_obj = len(gt.scene["objects"])
        assert len(np.unique(d["instances"][i])) - 1 <= n_obj and d["instances"][i].max() >= 1
