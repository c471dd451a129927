"""The contract every registered extractor passes (schema, dtype, determinism, batch invariance).

Each extractor's test module calls ``assert_contract`` for every configuration it supports;
``tests/conditions/test_registry.py`` checks that every registered extractor has such a test.
"""

from __future__ import annotations

import json

import numpy as np

from pipelines.conditions.base import Batch, Extractor


def make_batch(n: int = 4, resolution: int = 32, seed: int = 0, with_gt: bool = False) -> Batch:
    """A batch of smooth random images with a few solid rectangles, captions and (optionally) GT."""
    rng = np.random.default_rng(seed)
    r = resolution
    yy, xx = np.mgrid[0:r, 0:r] / max(r - 1, 1)
    images = np.empty((n, r, r, 3), np.uint8)
    inst = np.zeros((n, r, r), np.uint8)
    depth = np.zeros((n, r, r), np.uint8)
    for i in range(n):
        base = (
            rng.uniform(0, 255, (3,)) * (0.5 + 0.5 * xx[..., None]) + rng.uniform(0, 60, (3,)) * yy[..., None]
        )
        img = base.astype(np.float32)
        for k in range(1, 3):
            y0, x0 = rng.integers(0, r // 2, 2)
            h, w = rng.integers(r // 6 + 1, r // 2, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, (3,))
            inst[i, y0 : y0 + h, x0 : x0 + w] = k
            depth[i, y0 : y0 + h, x0 : x0 + w] = 80 * k
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    texts = np.array([f"a photo number {i} of a red square" for i in range(n)], dtype=object)
    return {
        "image": images,
        "text": texts,
        "gt_instances": inst,
        "gt_depth": depth,
        "has_gt": np.full((n,), with_gt, dtype=bool),
    }


def _take(batch: Batch, i: int) -> Batch:
    return {k: v[i : i + 1] for k, v in batch.items()}


def assert_contract(
    extractor: Extractor, batch: Batch, atol: float = 0.0, map_tol_frac: float = 0.0
) -> Batch:
    """Run the contract on ``extractor`` and return its output for ``batch``.

    ``atol``: allowed absolute difference for float outputs between a batched and a single call
    (0 for pure numpy extractors; small for neural ones, whose kernels may differ by batch size).
    ``map_tol_frac``: for uint8 maps, the allowed fraction of pixels differing by more than 1.
    """
    n = len(batch["image"])
    specs = extractor.columns()
    assert specs, f"{extractor.name} declares no columns"
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    for s in specs:
        assert s.name == extractor.name or s.name.startswith(extractor.name + "."), s.name
        assert s.dtype in ("float16", "uint8")
    json.dumps(extractor.describe())
    assert extractor.fingerprint() == extractor.fingerprint()
    res = extractor.resources()
    assert set(res) >= {"batch_size", "concurrency", "num_cpus", "num_gpus"}

    out = extractor(batch)
    again = extractor(batch)
    for s in specs:
        a = out[s.name]
        assert a.dtype == np.dtype(s.dtype) and a.shape == (n, *s.shape), (s.name, a.dtype, a.shape)
        if a.dtype == np.float16:
            assert np.isfinite(a).all(), f"{s.name} has non-finite values"
        np.testing.assert_array_equal(a, again[s.name], err_msg=f"{s.name} is not deterministic")

    singles = [extractor(_take(batch, i)) for i in range(n)]
    for s in specs:
        joined = np.concatenate([o[s.name] for o in singles])
        if s.dtype == "uint8":
            diff = np.abs(joined.astype(np.int16) - out[s.name].astype(np.int16))
            frac = float((diff > 1).mean())
            assert frac <= map_tol_frac, f"{s.name}: batch != singles on {frac:.4f} of pixels"
            if map_tol_frac == 0.0:
                np.testing.assert_array_equal(joined, out[s.name], err_msg=f"{s.name}: batch != singles")
        else:
            np.testing.assert_allclose(
                joined.astype(np.float32),
                out[s.name].astype(np.float32),
                atol=atol,
                rtol=0,
                err_msg=f"{s.name}: batch of {n} != {n} single calls",
            )
    return out
