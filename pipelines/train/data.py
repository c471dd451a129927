"""Training data: decomposition shards -> augmented batches, through Ray Data.

    manifest.json + shards/*.parquet
      -> read_parquet (only the columns the model uses; file order shuffled every epoch)
      -> map_batches(prepare_batch): decode the fixed-size binary columns, augment (random crop,
         random-weight intensity, a fresh mask), tokenize captions      (CPU tasks)
      -> TorchTrainer: get_dataset_shard("train").iter_torch_batches(prefetch)   (each worker)

``prepare_batch`` lives here, apart from the training loop, so Ray pickles only this module's
small closure (the anyscale stable-diffusion templates do the same). Its output is numpy, uint8
for images and maps, so the object store carries a quarter of the float bytes; the worker turns a
batch into model inputs with ``pipelines.diffusion.inputs.to_conditions``, as the generation
pipeline does.
"""

from __future__ import annotations

from typing import Any

from pipelines.data.batches import BatchRecipe, DataSpec, prepare_batch

ROWS_PER_READ_TASK = 4096  # ~120 MB of 64 px rows: large enough that Ray's per-task cost is small


def read_parallelism(rows: int, files: int, cpus: float) -> int:
    """Read tasks per epoch: a few per CPU, more for big data, never more than the files.

    Ray Data's own estimate gives one task per small shard file; on 2 CPUs that made the reader
    3x slower (16k rows at 64 px: 3.2 s against 1.0 s with 8 tasks, benchmarks/train.py)."""
    return max(1, min(files, max(4 * int(cpus), -(-rows // ROWS_PER_READ_TASK))))


def read_shards(files: list[str], columns: list[str], shuffle: Any = None, num_blocks: int | None = None):
    """``ray.data.read_parquet`` of ``files`` (only ``columns``) through Ray's V1 parquet reader.

    Ray 2.60's default V2 reader starts 32 footer-indexing actors every time a dataset executes,
    i.e. once per epoch in training: 1-1.5 s per epoch on a small machine, which showed as 41%
    data wait against 4% with V1 in benchmarks/train.py. V1 prunes columns in the scan as well.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, columns=columns, shuffle=shuffle, override_num_blocks=num_blocks)
    finally:
        ctx.use_datasource_v2 = previous


def build_dataset(spec: DataSpec, recipe: BatchRecipe, shuffle_files: bool, seed: int, augment_cpus: float):
    """The Ray Dataset of prepared batches (lazy; executed once per epoch by each consumer)."""
    import ray
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle_files else None
    blocks = read_parallelism(spec.rows, len(spec.files), ray.cluster_resources().get("CPU", 1))
    ds = read_shards(list(spec.files), list(recipe.columns), shuffle, blocks)
    return ds.map_batches(
        prepare_batch,
        fn_kwargs={"recipe": recipe},
        batch_format="pyarrow",
        batch_size=64,
        num_cpus=augment_cpus,
        zero_copy_batch=True,
    )
