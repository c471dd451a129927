"""``recompose evaluate``: how well a trained pipeline recomposes, measured (issue "Evaluate").

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
- **FID / KID / CLIP score** (``eval_quality``) when their weights are given locally: caption-only
  images against the real images of the evaluation rows (the zero-shot COCO protocol).

Generation and re-extraction run on ``workers`` Ray actors (one pipeline each); the driver reads
the rows, gathers the records and writes ``eval_report``'s table, plots and MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import config_hash, to_dict
from pipelines.evaluate.config import EvalConfig

FORMAT = "recompose.evaluate/1"
FIDELITY = ("palette", "sketch", "instances", "depth", "intensity")  # re-extracted representations


class EvalError(ValueError):
    """Bad model, data, output or configuration for the evaluation; the message says which."""


# -- rows -----------------------------------------------------------------------------------------
def load_rows(cfg: EvalConfig, model_config: Any, spec: Any) -> list[dict[str, Any]]:
    """The first ``num_samples`` rows of ``spec`` at the model's side R, as the model takes them.

    Each row: "key", "text", "image" (R, R, 3) uint8, "inputs" condition -> model input keys
    (``model_inputs.py``), "given" representation -> the value given (palette (156,), maps
    (R, R) uint8) and "mask" (R, R) {0, 1}. Maps are resized exactly as training resizes them
    (``augment.crop_and_flip`` with the full frame), intensity is the stored BT.601 one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.conditions.mask import MaskGenerator
    from pipelines.data.augment import AugmentConfig
    from pipelines.data.batches import make_recipe, prepare_batch

    conditions = tuple(c for c in spec.conditions if c != "mask")
    full_frame = AugmentConfig(crop_scale=(1.0, 1.0), flip=False, random_intensity=False)
    recipe = make_recipe(spec, model_config, conditions, full_frame)
    names = set(pq.read_schema(spec.files[0]).names)
    columns = [c for c in ("key", "text") if c in names and c not in recipe.columns] + list(recipe.columns)
    tables, n = [], 0
    for f in spec.files:
        t = pq.read_table(f, columns=columns)
        tables.append(t.slice(0, cfg.num_samples - n))
        n += tables[-1].num_rows
        if n >= cfg.num_samples:
            break
    if n < cfg.num_samples:
        raise EvalError(f"--data {spec.root}: holds {n} rows, fewer than --num-samples {cfg.num_samples}")
    table = pa.concat_tables(tables)
    batch = prepare_batch(table, recipe)
    r = recipe.size
    masks = MaskGenerator(full_frame.mask, r).generate(
        n, r, np.random.default_rng(cfg.mask_seed), batch.get("instances")
    )
    keys = table.column("key").to_pylist() if "key" in table.column_names else list(range(n))
    texts = table.column("text").to_pylist() if "text" in table.column_names else [""] * n
    rows = []
    for i in range(n):
        inputs: dict[str, dict[str, Any]] = {}
        if "caption" in conditions and batch["has_caption"][i]:
            if model_config.caption_encoder == "trainable":
                inputs["caption"] = {"text": str(texts[i])}
            else:
                inputs["caption"] = {k: batch[k][i] for k in batch if k.startswith("caption.")}
        if "semantics" in conditions:
            sem = batch.get("semantics")
            inputs["semantics"] = (
                {"semantics": sem[i]} if sem is not None else {"semantics.image": batch["image"][i]}
            )
        given = {}
        for name in FIDELITY:
            if name in batch:
                given[name] = batch[name][i]
                inputs[name] = {name: batch[name][i]}
        inputs["mask"] = {}  # the pipeline adds the mask inputs from source= and mask=
        rows.append(
            {
                "key": str(keys[i]),
                "text": str(texts[i] or ""),
                "image": batch["image"][i],
                "inputs": inputs,
                "given": given,
                "mask": masks[i],
            }
        )
    return rows


def is_synthetic(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows' captions are the synthetic generator's (``synth_scene`` grammar)."""
    from pipelines.data.scene import parse_caption

    try:
        for r in rows:
            parse_caption(r["text"])
    except ValueError:
        return False
    return bool(rows)


def reextract_settings(settings: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """The pipeline's decomposition settings, with ``reextract.depth_weights`` as the depth model."""
    settings = dict(settings)
    if cfg.reextract.depth_weights:
        settings["depth"] = {**settings.get("depth", {}), "weights": cfg.reextract.depth_weights}
    return settings


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


# -- the work on each actor ----------------------------------------------------------------------
class EvalWorker:
    """One pipeline and its extractors: generates units of work and measures what it made."""

    def __init__(self, model: str, cfg: EvalConfig, methods: dict[str, str], device: str = "auto"):
        import torch

        from pipelines.data.decomposer import ImageDecomposer
        from pipelines.diffusion.loading import load_pipeline, resolve_device

        if device == "auto" and cfg.gpus_per_worker == 0:
            device = "cpu"
        device = resolve_device(device)
        if device == "cpu" and torch.get_num_threads() > max(1, int(cfg.cpus_per_worker)):
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # Ray's CPU share, not the host's
        self.pipe = load_pipeline(model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.cfg, self.methods = cfg, methods
        unet = self.pipe.unet.config
        settings = reextract_settings(self.pipe.config.decompose, cfg)
        self.dec = ImageDecomposer(
            settings, self.pipe.image_size, unet.caption_encoder, unet.semantics_encoder, device
        )

    def run(self, unit: dict[str, Any]) -> dict[str, Any]:
        """unit: "name", "kind" (subset / real / bench), "rows" (indices), "data" (row dicts),
        "conditions" -> {"name", "rows", "images" (B, R, R, 3) uint8, "records"}."""
        import ray

        from pipelines.diffusion.pipeline import SampleRequest

        t0 = time.perf_counter()
        rows = unit["data"]
        if isinstance(rows, ray.ObjectRef):  # one copy per batch of rows in the object store
            rows = ray.get(rows)
        if unit["kind"] in ("real", "bench-real"):
            images = [r["image"] for r in rows]
        else:
            conds = unit["conditions"]
            guidance = unit.get("guidance", self.cfg.guidance)
            requests = []
            for i, r in zip(unit["rows"], rows, strict=True):
                inputs = {k: v for c in conds for k, v in r["inputs"][c].items()}
                masked = "mask" in conds
                requests.append(
                    SampleRequest(
                        inputs,
                        guidance=guidance if conds else 1.0,
                        seed=self.cfg.seed + i,
                        source=r["image"] if masked else None,
                        mask=r["mask"] if masked else None,
                    )
                )
            outs = self.pipe.sample_batch(requests, num_inference_steps=self.cfg.steps)
            images = [np.asarray(o.images[0]) for o in outs]
        records = [self.measure(img, r, unit) for img, r in zip(images, rows, strict=True)]
        return {
            "name": unit["name"],
            "rows": unit["rows"],
            "images": np.stack(images),
            "records": records,
            "seconds": time.perf_counter() - t0,
        }

    def measure(self, image: np.ndarray, row: dict[str, Any], unit: dict[str, Any]) -> dict[str, Any]:
        from pipelines.evaluate.fidelity import condition_fidelity
        from pipelines.evaluate.scene_parser import parse_scene, scene_maps, score

        rec: dict[str, Any] = {}
        if unit["kind"] in ("bench", "bench-real"):
            rec["bench"] = score(parse_scene(image), row["text"])
            return rec
        want = [n for n in FIDELITY if n in row["given"] and n in self.methods]
        extracted = self.dec.decompose(image, [n for n in want if self.methods[n] == "extractor"])
        if any(self.methods[n] == "scene" for n in want):
            extracted["instances"], extracted["depth"] = scene_maps(image)
        for name in want:
            kw = {"tolerance_px": self.cfg.reextract.edge_tolerance_px} if name == "sketch" else {}
            for metric, value in condition_fidelity(name, row["given"][name], extracted[name], **kw).items():
                rec[f"{name}.{metric}"] = float(value)
        if "mask" in unit.get("conditions", ()):
            m = condition_fidelity("mask", row["image"], image, mask=row["mask"])
            rec["mask.max_abs_diff"] = float(m["max_abs_diff"])
        return rec


# -- units of work -------------------------------------------------------------------------------
def benchmark_rows(cfg: EvalConfig, resolution: int) -> list[dict[str, Any]]:
    """Fresh generator scenes: ``num_captions`` seen then as many held-out, at the model's side."""
    from pipelines.data.scene import render_sample

    n = cfg.benchmark.num_captions or cfg.num_samples
    out = []
    for split in ("train", "heldout"):
        for i in range(n):
            s = render_sample(cfg.benchmark.seed, split, i, resolution)
            out.append({"key": f"{split}/{i}", "text": s.caption, "image": s.image, "split": split})
    return out


def make_units(
    cfg: EvalConfig, rows: list[dict[str, Any]], available: set[str], bench: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Units of at most ``batch_size`` rows: each subset, ``none``, ``real`` and the benchmark.

    A subset asking for a condition the model or data lacks is skipped (reason returned)."""
    subsets: dict[str, tuple[str, ...]] = {"none": ()}
    skipped: dict[str, str] = {}
    for name, conds in cfg.subsets.items():
        missing = [c for c in conds if c not in available]
        if missing:
            skipped[name] = f"the model or data has no {', '.join(missing)}"
        else:
            subsets[name] = tuple(conds)
    units = []
    b = cfg.batch_size
    for start in range(0, len(rows), b):
        idx = list(range(start, min(len(rows), start + b)))
        data = [rows[i] for i in idx]
        for name, conds in subsets.items():
            units.append({"name": name, "kind": "subset", "conditions": conds, "rows": idx, "data": data})
        units.append({"name": "real", "kind": "real", "rows": idx, "data": data})
    if bench:
        n = len(bench) // 2
        for side, part in (("seen", bench[:n]), ("heldout", bench[n:])):
            for start in range(0, n, b):
                idx = list(range(start, min(n, start + b)))
                data = [{**part[i], "inputs": {"caption": {"text": part[i]["text"]}}} for i in idx]
                units.append(
                    {
                        "name": f"bench/{side}",
                        "kind": "bench",
                        "conditions": ("caption",),
                        "guidance": cfg.benchmark.guidance,
                        "rows": idx,
                        "data": data,
                    }
                )
                # The floor: unconditional images of the same seeds, read against the same captions.
                units.append(
                    {
                        "name": f"bench-none/{side}",
                        "kind": "bench",
                        "conditions": (),
                        "rows": idx,
                        "data": data,
                    }
                )
                units.append({"name": f"bench-real/{side}", "kind": "bench-real", "rows": idx, "data": data})
    return units, skipped


# -- driver ---------------------------------------------------------------------------------------
def _check_output(out: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """An existing evaluation in ``out`` must be of the same model, data and settings."""
    if not out.exists():
        return None
    summary = out / "evaluate.json"
    if not out.is_dir() or (any(out.iterdir()) and not summary.is_file()):
        raise EvalError(f"--output {out}: exists and is not an evaluation output; give a new directory")
    if not summary.is_file():
        return None
    prev = json.loads(summary.read_text())
    for k, v in ident.items():
        if prev.get(k) != v:
            raise EvalError(
                f"--output {out}: holds an evaluation with another {k} ({prev.get(k)!r}, now {v!r}); "
                "give a new directory"
            )
    return prev


def run_evaluate(cfg: EvalConfig, log=sys.stderr) -> dict[str, Any]:
    """The whole evaluation (module docstring); returns the summary written to evaluate.json."""
    import ray
    from tqdm import tqdm

    from pipelines.data.batches import DataError, open_data
    from pipelines.diffusion.loading import ModelError, pipeline_dir
    from pipelines.evaluate import report as eval_report
    from pipelines.evaluate.quality import unavailable as quality_unavailable

    if not cfg.model or not cfg.data or not cfg.output:
        raise EvalError("--model, --data and --output are required")
    t0 = time.time()
    try:
        pdir = pipeline_dir(cfg.model)
    except ModelError as e:
        raise EvalError(str(e)) from None
    try:
        spec = open_data(cfg.data)
    except DataError as e:
        raise EvalError(str(e)) from None
    out = Path(cfg.output)
    ehash = config_hash(cfg)
    prev = _check_output(out, {"format": FORMAT, "model": cfg.model, "data": spec.root, "config_hash": ehash})
    model_config, settings, training = _model_info(pdir)
    rows = load_rows(cfg, model_config, spec)
    synthetic = is_synthetic(rows)
    from pipelines.data.decomposer import ImageDecomposer

    side = int(model_config.sample_size) * int(model_config.local_downsample)  # the model's image side
    dec = ImageDecomposer(reextract_settings(settings, cfg), side)
    unavailable = {n: why for n in ("depth", "instances") if (why := dec.unavailable_reason(n))}
    methods = reextract_methods(cfg, synthetic, unavailable)
    available = set(spec.conditions) | {"mask"}
    bench_reason = None
    bench = None
    if cfg.benchmark.enabled == "on" and not synthetic:
        raise EvalError("benchmark.enabled=on needs synthetic data (the rows' captions are not synthetic)")
    if cfg.benchmark.enabled != "off" and synthetic:
        if model_config.caption_encoder != "trainable":
            bench_reason = "the model's caption encoder needs CLIP/T5 embeddings of new captions"
        elif "caption" not in available:
            bench_reason = "the model was not trained on captions"
        else:
            bench = benchmark_rows(cfg, side)
    elif cfg.benchmark.enabled == "off":
        bench_reason = "benchmark.enabled is off"
    else:
        bench_reason = "the data's captions are not the synthetic generator's"
    units, skipped = make_units(cfg, rows, available, bench)
    if bench_reason:
        skipped["benchmark"] = bench_reason
    for name in ("depth", "instances"):
        if name not in methods:  # asked of an extractor these settings cannot run
            skipped[f"{name} fidelity"] = unavailable[name]
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[evaluate] {len(rows)} rows x {len({u['name'] for u in units if u['kind'] == 'subset'})} subsets"
        + (f" + benchmark {len(bench)} captions" if bench else "")
        + f" on {cfg.workers} Ray workers; re-extraction: "
        + ", ".join(f"{k}={v}" for k, v in methods.items()),
        file=log,
        flush=True,
    )
    for name, why in skipped.items():
        print(f"[evaluate] skipping {name}: {why}", file=log, flush=True)

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    env = (
        {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
        if "MLFLOW_TRACKING_URI" in os.environ
        else {}
    )
    worker = ray.remote(EvalWorker).options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        runtime_env={"env_vars": env} if env else None,
    )
    shared: dict[int, Any] = {}  # the units of one batch of rows share their data: put it once
    alive = [u["data"] for u in units]  # noqa: F841 - keeps every id() unique while mapping
    for u in units:
        if id(u["data"]) not in shared:
            shared[id(u["data"])] = ray.put(u["data"])
        u["data"] = shared[id(u["data"])]
    actors = [worker.remote(cfg.model, cfg, methods) for _ in range(cfg.workers)]
    pool = ray.util.ActorPool(actors)
    results: list[dict[str, Any]] = []
    total = sum(len(u["rows"]) for u in units)
    with tqdm(total=total, desc="evaluate", unit="img", file=log, disable=not cfg.progress) as bar:
        for res in pool.map_unordered(lambda a, u: a.run.remote(u), units):
            results.append(res)
            bar.update(len(res["rows"]))
    for a in actors:
        ray.kill(a)

    quality_missing = quality_unavailable(cfg.quality)  # loads and checks the weight files: once
    images = eval_images(results, len(rows))
    quality = _quality(cfg, rows, images, quality_missing)
    summary = {
        "format": FORMAT,
        "model": cfg.model,
        "pipeline_dir": str(pdir),
        "data": spec.root,
        "manifest_hash": spec.manifest_hash,
        "config_hash": ehash,
        "config": to_dict(cfg),
        "num_rows": len(rows),
        "synthetic": synthetic,
        "reextract": methods,
        "skipped": skipped,
        "training": training,
        "quality_unavailable": quality_missing,
        "seconds": None,
    }
    report = eval_report.write_report(out, summary, rows, results, images, quality, cfg)
    summary["seconds"] = round(time.time() - t0, 1)
    summary.update(report)
    if cfg.mlflow.enabled:
        summary["mlflow"] = eval_report.log_mlflow(out, summary, cfg, pdir, prev)
    (out / "evaluate.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[evaluate] done in {summary['seconds']:.0f}s: {out / 'results.md'}", file=log, flush=True)
    return summary


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


def _quality(
    cfg: EvalConfig, rows: list[dict[str, Any]], images: dict[str, np.ndarray], missing: dict[str, str]
) -> dict:
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


def eval_images(results: list[dict[str, Any]], n: int) -> dict[str, np.ndarray]:
    """Unit results -> name -> (n, R, R, 3) images in row order."""
    by: dict[str, dict[int, np.ndarray]] = {}
    for res in results:
        d = by.setdefault(res["name"], {})
        for i, img in zip(res["rows"], res["images"], strict=True):
            d[i] = img
    return {k: np.stack([v[i] for i in sorted(v)]) for k, v in by.items()}


__all__ = ["EvalError", "EvalWorker", "load_rows", "run_evaluate"]
