"""``recompose evaluate``: how well a trained pipeline recomposes, measured.

For the first ``num_samples`` rows of a decomposition output, with fixed seeds (row i: seed + i
under every subset, so subsets differ only in their conditions):

- **condition fidelity**: every subset of ``EvalConfig.subsets`` is generated; each
  representation is re-extracted from each image with the model's own extractors (its
  ``model_index.json`` decomposition settings) and compared with the condition given
  (``pipelines/evaluate/fidelity.py``). Depth and instances of synthetic rows are ground truth, which a
  generated image lacks: they are re-read by the scene parser (``scene_parser.scene_maps``)
  unless a depth model / the instances extractor is asked for (``reextract``).
- **floor and ceiling in the same run**: subset ``none`` (every condition dropped) and ``real``
  (the real image itself, re-extracted the same way, so its row also shows what re-extraction
  alone costs).
- **the synthetic compositional benchmark** (synthetic data): captions drawn fresh from the
  generator, seen vs held-out (colour, shape) pairs, generated from the caption alone and read
  back by ``scene_parser``; the unconditional images and the generator's own renders are the
  floor and ceiling.
- **FID / KID / CLIP score** (``quality``) when their weights are given locally: caption-only
  images against the real images of the evaluation rows (the zero-shot COCO protocol).

Generation and re-extraction run as a Ray Data actor stage of ``workers`` actors (one pipeline
each, ``worker.py``) over the work units (``units.py``); the driver reads the rows, gathers the
images and measurements in unit order and writes the report (``report.py``) and MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import config_hash, to_dict
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import FORMAT, OUTPUTS, EvalResult
from pipelines.evaluate.units import (
    EVAL,
    EvalError,
    Row,
    RowSets,
    Unit,
    UnitResult,
    benchmark_rows,
    is_synthetic,
    load_rows,
    make_units,
    runnable_subsets,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """What one evaluation generates and measures."""

    rowsets: RowSets  # EVAL -> the data's rows; "bench/<side>" -> benchmark rows when it runs
    synthetic: bool  # the data's captions are the synthetic generator's
    methods: dict[str, str]  # representation -> "extractor" / "scene"
    units: list[Unit]
    skipped: dict[str, str]  # what is not measured -> why


def run_evaluate(cfg: EvalConfig) -> EvalResult:
    """The whole evaluation (module docstring); returns the summary written to evaluate.json."""
    from pipelines.evaluate import mlflow_run, report
    from pipelines.evaluate.quality import unavailable as quality_unavailable
    from pipelines.files import write_json

    t0 = time.time()
    pdir, spec, out, prev = _check(cfg)
    model_config, settings, training = _model_info(pdir)
    cascade = _cascade_sides(cfg.model, cfg.resolution)
    plan = _plan(cfg, spec, model_config, settings)
    _log_plan(cfg, plan)
    out.mkdir(parents=True, exist_ok=True)
    results = generate(cfg, plan)
    rows = plan.rowsets[EVAL]
    images = eval_images(results, len(rows))
    quality_missing = quality_unavailable(cfg.quality)  # loads and checks the weight files: once
    quality = _quality(cfg, rows, images, quality_missing)
    result = EvalResult(
        format=FORMAT,
        model=cfg.model,
        pipeline_dir=str(pdir),
        data=spec.root,
        manifest_hash=spec.manifest_hash,
        config_hash=config_hash(cfg),
        config=to_dict(cfg),
        num_rows=len(rows),
        synthetic=plan.synthetic,
        reextract=plan.methods,
        skipped=plan.skipped,
        training=training,
        quality_unavailable=quality_missing,
        resolution=int(model_config.sample_size) * int(model_config.local_downsample),
        cascade=cascade,
    )
    result = report.write_report(out, result, rows, results, images, quality, cfg)
    result = dataclasses.replace(result, seconds=round(time.time() - t0, 1))
    if cfg.mlflow.enabled:
        result = dataclasses.replace(result, mlflow=mlflow_run.log_run(out, result, cfg, pdir, prev))
    write_json(result.to_dict(), out / "evaluate.json")
    _log_result(result, out)
    return result


# -- check ----------------------------------------------------------------------------------------
def _check(cfg: EvalConfig) -> tuple[Path, Any, Path, dict[str, Any] | None]:
    """The model's pipeline directory, the data, the output directory and its earlier evaluation;
    a ``UserError`` on anything missing, unreadable or someone else's."""
    from pipelines.data.batches import open_data
    from pipelines.diffusion.cascade import is_cascade, read_index
    from pipelines.diffusion.loading import model_path, pipeline_dir
    from pipelines.files import claim_output

    if not cfg.model or not cfg.data or not cfg.output:
        raise EvalError("--data and --output are required (and --model, when given, must not be empty)")
    root = model_path(cfg.model)
    if is_cascade(root):  # measured at the output side: that stage's config decides the rows
        index = read_index(root)
        sides = index["resolutions"]
        if cfg.resolution is not None and cfg.resolution not in sides:
            raise EvalError(
                f"resolution {cfg.resolution}: this cascade makes {', '.join(map(str, sides))} px"
            )
        pdir = root / index["stages"][sides.index(cfg.resolution) if cfg.resolution else -1]
    else:
        pdir = pipeline_dir(cfg.model)
        unet = json.loads((pdir / "unet" / "config.json").read_text())
        if unet.get("upsample_factor", 1) > 1:
            raise EvalError(
                f"--model {cfg.model}: is an upsampler; evaluate the cascade it belongs to (recompose cascade)"
            )
        side = int(unet["sample_size"]) * int(unet.get("local_downsample", 1))
        if cfg.resolution not in (None, side):
            raise EvalError(
                f"resolution {cfg.resolution}: this model makes {side} px (resolution is for a cascade)"
            )
    spec = open_data(cfg.data)
    out = Path(cfg.output)
    identity = {"format": FORMAT, "model": cfg.model, "data": spec.root, "config_hash": config_hash(cfg)}
    # An earlier run killed before its evaluate.json leaves only files of ours behind.
    prev = claim_output(out, "evaluate.json", "recompose evaluation", identity, ours=_ours)
    return pdir, spec, out, prev


def _cascade_sides(model: str, resolution: int | None) -> list[int] | None:
    """The sides of the cascade stages that run (up to ``resolution``); None for a pipeline."""
    from pipelines.diffusion.cascade import is_cascade, read_index
    from pipelines.diffusion.loading import model_path

    root = model_path(model)
    if not is_cascade(root):
        return None
    sides = list(read_index(root)["resolutions"])
    return sides[: sides.index(resolution) + 1] if resolution else sides


def _ours(path: Path) -> bool:
    return path.name in OUTPUTS or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _model_info(pdir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The UNet config, the decomposition settings and the training record of a saved pipeline."""
    from diffusers.configuration_utils import FrozenDict  # attribute access, as make_recipe reads it

    from models import ComposerModel

    index = json.loads((pdir / "model_index.json").read_text())
    model_config = ComposerModel.load_config(str(pdir / "unet"))
    training = {}
    rec = pdir / "recompose-training.json"
    if rec.is_file():
        training = json.loads(rec.read_text())
    return FrozenDict(model_config), dict(index.get("decompose") or {}), training


# -- load rows ------------------------------------------------------------------------------------
def _plan(cfg: EvalConfig, spec: Any, model_config: Any, settings: dict[str, Any]) -> _Plan:
    """The rows, how each representation is read back, the units and what is skipped (and why)."""
    from pipelines.data.decomposer import ImageDecomposer
    from pipelines.evaluate.worker import reextract_settings

    rows = load_rows(cfg, model_config, spec)
    synthetic = is_synthetic(rows)
    side = int(model_config.sample_size) * int(model_config.local_downsample)  # the model's image side
    dec = ImageDecomposer(reextract_settings(settings, cfg), side)
    unavailable = {n: why for n in ("depth", "instances") if (why := dec.unavailable_reason(n))}
    methods = reextract_methods(cfg, synthetic, unavailable)
    available = set(spec.conditions) | {"mask"}
    subsets, skipped = runnable_subsets(cfg, available)
    rowsets: RowSets = {EVAL: rows}
    bench_reason = _benchmark_skipped(cfg, synthetic, model_config, available)
    if bench_reason:
        skipped["benchmark"] = bench_reason
    else:
        rowsets.update(benchmark_rows(cfg, side))
    for name in ("depth", "instances"):
        if name not in methods:  # asked of an extractor these settings cannot run
            skipped[f"{name} fidelity"] = unavailable[name]
    return _Plan(rowsets, synthetic, methods, make_units(cfg, rowsets, subsets), skipped)


def reextract_methods(cfg: EvalConfig, synthetic: bool, unavailable: dict[str, str]) -> dict[str, str]:
    """Representation -> how it is read back from an image ("extractor" or "scene")."""
    out = {n: "extractor" for n in ("palette", "sketch", "intensity")}
    for name in ("depth", "instances"):
        m = getattr(cfg.reextract, name)
        if m == "auto":
            m = "scene" if synthetic else "extractor"
        if m == "scene" and not synthetic:
            raise EvalError(f"reextract.{name}=scene needs synthetic data (its captions are not)")
        if m == "extractor" and name in unavailable:
            continue
        out[name] = m
    return out


def _benchmark_skipped(
    cfg: EvalConfig, synthetic: bool, model_config: Any, available: set[str]
) -> str | None:
    """Why the compositional benchmark does not run, or None when it does."""
    enabled = cfg.benchmark.enabled
    if enabled == "on" and not synthetic:
        raise EvalError("benchmark.enabled=on needs synthetic data (the rows' captions are not synthetic)")
    if enabled == "off":
        return "benchmark.enabled is off"
    if not synthetic:
        return "the data's captions are not the synthetic generator's"
    if model_config.caption_encoder not in ("trainable", "base"):  # a base's pipeline encodes text itself
        return "the model's caption encoder needs CLIP/T5 embeddings of new captions"
    if "caption" not in available:
        return "the model was not trained on captions"
    return None


def _log_plan(cfg: EvalConfig, plan: _Plan) -> None:
    subsets = len({u.name for u in plan.units if u.kind == "subset"})
    bench = sum(len(v) for k, v in plan.rowsets.items() if k != EVAL)
    logger.info(
        "%d rows x %d subsets%s on %d Ray workers; re-extraction: %s",
        len(plan.rowsets[EVAL]),
        subsets,
        f" + benchmark {bench} captions" if bench else "",
        cfg.workers,
        ", ".join(f"{k}={v}" for k, v in plan.methods.items()),
    )
    for name, why in plan.skipped.items():
        logger.info("skipping %s: %s", name, why)


# -- generate -------------------------------------------------------------------------------------
def generate(cfg: EvalConfig, plan: _Plan) -> list[UnitResult]:
    """Every unit through ``workers`` ``EvalWorker`` actors (a Ray Data actor stage, one unit per
    call); results in unit order whatever order they finish in, so reruns write the same tables."""
    import ray
    from tqdm import tqdm

    from pipelines.evaluate.worker import EvalWorker

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images instead
    rows_ref = ray.put(plan.rowsets)  # once in the object store; each actor fetches it once
    items = [{"index": i, "unit": u.to_json()} for i, u in enumerate(plan.units)]
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}  # models:/ URIs
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EvalWorker,
        fn_constructor_kwargs={"model": cfg.model, "cfg": cfg, "methods": plan.methods, "rows": rows_ref},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
        batch_format="numpy",
        runtime_env={"env_vars": env} if env else None,
    )
    got: dict[tuple[int, int], tuple[np.ndarray, dict[str, Any]]] = {}
    total = sum(len(u.rows) for u in plan.units)
    with tqdm(total=total, desc="evaluate", unit="img", disable=not cfg.progress) as bar:
        for r in ds.iter_rows():
            got[int(r["index"]), int(r["row"])] = (np.asarray(r["image"]), json.loads(r["record"]))
            bar.update(1)
    return [
        UnitResult(
            u.name,
            u.rows,
            np.stack([got[i, j][0] for j in u.rows]),
            [got[i, j][1] for j in u.rows],
        )
        for i, u in enumerate(plan.units)
    ]


def eval_images(results: list[UnitResult], n: int) -> dict[str, np.ndarray]:
    """Unit results -> name -> (n, R, R, 3) uint8 images in row order."""
    by: dict[str, dict[int, np.ndarray]] = {}
    for res in results:
        d = by.setdefault(res.name, {})
        for i, img in zip(res.rows, res.images, strict=True):
            d[i] = img
    return {k: np.stack([v[i] for i in sorted(v)]) for k, v in by.items()}


# -- score ----------------------------------------------------------------------------------------
def _quality(
    cfg: EvalConfig, rows: list[Row], images: dict[str, np.ndarray], missing: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """FID/KID of caption-only and unconditional images against the real rows; CLIP score of
    those and of the real images with the rows' captions. Only what ``missing`` does not name."""
    from pipelines.evaluate.quality import clip_score, fid_kid_sets

    texts = [r["text"] for r in rows]
    sets = {k: images[k] for k in ("caption", "none") if k in images}
    out: dict[str, dict[str, Any]] = {k: {} for k in (*sets, "real")}
    if "fid" not in missing and sets:
        for name, res in fid_kid_sets(images["real"], sets, cfg.quality).items():
            res["inception_resize"] = res.pop("resize")
            out[name].update(res)
    if "clip_score" not in missing and any(texts):
        for name in out:
            res = clip_score(images[name], texts, cfg.quality)
            res["clip_resize"] = res.pop("resize")
            out[name].update(res)
    return {k: v for k, v in out.items() if v}


# -- log ------------------------------------------------------------------------------------------
def _log_result(result: EvalResult, out: Path) -> None:
    logger.info("done in %.0fs: %s", result.seconds, out / "results.md")
    for b in result.quality_bar:
        verdict = "" if b["pass"] is None else ("  pass" if b["pass"] else "  FAIL")
        ratio = "" if b["ratio"] is None else f"  {b['ratio']:.2f}x the unconditional floor"
        logger.info("%-22s %-18s %.3f%s%s", b["condition"], b["metric"], b["value"], ratio, verdict)


__all__ = ["EvalError", "EvalResult", "reextract_methods", "run_evaluate"]
