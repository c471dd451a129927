"""``benchmarks/train.py``'s reader part on a tiny decomposed set: the JSON's fields, no timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import train as bench
from pipelines.data.batches import open_data

pytestmark = pytest.mark.slow

READERS = ("raw_pyarrow", "ray_data", "ray_data_prepare")


@pytest.fixture(scope="module")
def spec(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("bench-train")
    # Few conditions: decomposing is set-up here, the reader reads whatever columns there are.
    return open_data(bench.make_data(Path(root), count=64, resolution=32, conditions=("palette", "sketch")))


def test_reader_figures(spec):
    recipe = bench.training_recipe(spec, "tiny")
    out = bench.reader_benchmark(spec, recipe, repeats=1, batch=16, warmup=False)
    assert out["columns"] == list(recipe.columns) and "image" in out["columns"]
    assert out["datasource"].startswith("v1")  # the reader training uses (train_data.read_shards)
    for name in READERS:
        assert out[name]["samples_per_s"] > 0, name
        assert out[name]["first_batch_s"] >= 0, name
        (run,) = out[name]["runs"]
        assert run["rows"] == spec.rows == 64, name
        assert run["seconds"] > 0, name
    assert out["ratio_reader"] == pytest.approx(
        out["ray_data"]["samples_per_s"] / out["raw_pyarrow"]["samples_per_s"]
    )
    assert out["goal_met"] == (out["ratio_reader"] >= 0.5)


def test_to_arrays_views_the_fixed_width_columns(spec):
    cols = bench.training_recipe(spec, "tiny").columns
    layout = bench.column_layout(spec, cols)
    table = pq.read_table(spec.files[0], columns=list(cols))
    arrays = bench.to_arrays(table, layout)
    r, n = spec.resolution, table.num_rows
    assert arrays["image"].shape == (n, r, r, 3) and arrays["image"].dtype == np.uint8
    assert arrays["sketch"].shape == (n, r, r) and arrays["sketch"].dtype == np.uint8
    assert arrays["palette"].shape == (n, 156) and arrays["palette"].dtype == np.float16
    assert "key" not in arrays and "text" not in arrays  # strings stay arrow


def test_bad_arguments(spec):
    with pytest.raises(ValueError, match="repeats"):
        bench.reader_benchmark(spec, bench.training_recipe(spec, "tiny"), repeats=0, batch=16)
