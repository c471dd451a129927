"""The evaluation's Ray Data actor stage, in its own module so Ray pickles little.

``EvalWorker`` holds one pipeline and its extractors; each call takes work units (``Unit`` as
JSON) and returns one output row per image: the unit's index, the row index, the image and the
measurements of it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.units import FIDELITY, Row, RowSets, Unit

# Inputs given at the output side that a lower stage takes at its own (``resize_for_stage``).
_MAPS = ("sketch", "instances", "depth", "intensity", "semantics.image", "mask.image")


def reextract_settings(settings: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """The pipeline's decomposition settings, with ``reextract.depth_weights`` as the depth model."""
    settings = dict(settings)
    if cfg.reextract.depth_weights:
        settings["depth"] = {**settings.get("depth", {}), "weights": cfg.reextract.depth_weights}
    return settings


class EvalWorker:
    """One pipeline and its extractors: generates units of work and measures what it made.

    ``rows``: the ``RowSets`` the units index, or an ObjectRef of them (fetched once per actor);
    ``methods``: representation -> how it is read back ("extractor" or "scene")."""

    def __init__(self, model: str, cfg: EvalConfig, methods: dict[str, str], rows: Any, device: str = "auto"):
        import ray
        import torch

        from pipelines.data.decomposer import ImageDecomposer
        from pipelines.diffusion.loading import load_cascade, resolve_device

        if device == "auto" and cfg.gpus_per_worker == 0:
            device = "cpu"
        device = resolve_device(device)
        if device == "cpu" and torch.get_num_threads() > max(1, int(cfg.cpus_per_worker)):
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # Ray's CPU share, not the host's
        self.cascade = load_cascade(model, device)  # a pipeline is a one-stage cascade
        self.cascade.stages = self.cascade.upto(cfg.resolution)
        for stage in self.cascade.stages:
            stage.set_progress_bar_config(disable=True)
        self.pipe = self.cascade.stages[-1]  # rows, maps and measurements are at its side
        self.cfg, self.methods = cfg, methods
        self.rows: RowSets = ray.get(rows) if isinstance(rows, ray.ObjectRef) else rows
        unet = self.pipe.unet.config
        settings = reextract_settings(self.pipe.config.decompose, cfg)
        self.dec = ImageDecomposer(
            settings, self.pipe.image_size, unet.caption_encoder, unet.semantics_encoder, device
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch: "index" (U,) int64 and "unit" (U,) ``Unit`` JSON -> one row per image: "index",
        "row" int64, "image" (R, R, 3) uint8, "record" (the measurements as JSON)."""
        out: dict[str, list[Any]] = {"index": [], "row": [], "image": [], "record": []}
        for index, text in zip(batch["index"], batch["unit"], strict=True):
            unit = Unit.from_json(str(text))
            images, records = self.run(unit)
            out["index"] += [int(index)] * len(unit.rows)
            out["row"] += list(unit.rows)
            out["image"] += images
            out["record"] += [json.dumps(r) for r in records]
        return {
            "index": np.asarray(out["index"], np.int64),
            "row": np.asarray(out["row"], np.int64),
            "image": np.stack(out["image"]),
            "record": np.asarray(out["record"], dtype=object),
        }

    def run(self, unit: Unit) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """The unit's images ((R, R, 3) uint8, in ``unit.rows`` order) and their measurements."""
        rows = [self.rows[unit.source][i] for i in unit.rows]
        images = (
            [r["image"] for r in rows] if unit.kind in ("real", "bench-real") else self.generate(unit, rows)
        )
        return images, [self.measure(img, r, unit) for img, r in zip(images, rows, strict=True)]

    def generate(self, unit: Unit, rows: list[Row]) -> list[np.ndarray]:
        """One batched sampling of ``rows`` under ``unit.conditions``; row i with seed + i."""
        from pipelines.diffusion.requests import SampleRequest

        conds = unit.conditions
        guidance = self.cfg.guidance if unit.guidance is None else unit.guidance
        masked = "mask" in conds
        requests = [
            SampleRequest(
                {k: v for c in conds for k, v in r["inputs"][c].items()},
                guidance=guidance if conds else 1.0,
                seed=self.cfg.seed + i,
                source=r["image"] if masked else None,
                mask=r["mask"] if masked else None,
            )
            for i, r in zip(unit.rows, rows, strict=True)
        ]
        if len(self.cascade.stages) == 1:
            outs = self.pipe.sample_batch(requests, num_inference_steps=self.cfg.steps)
            return [np.asarray(o.images[0]) for o in outs]
        return self._cascade(requests, guidance if conds else 1.0)

    def _cascade(self, requests: list[Any], guidance: Any) -> list[np.ndarray]:
        """The rows' requests (at the output side) through the cascade: the base's batched run on
        the inputs brought to its side, then each row's samples through the upsamplers."""
        from dataclasses import replace

        from pipelines.diffusion.cascade import StageInputs, resize_for_stage, upsample

        stages = self.cascade.stages

        def at(side: int, d: Any) -> Any:
            if d is None:
                return None
            return {
                k: resize_for_stage("image" if k.endswith("image") else k, v, side) if k in _MAPS else v
                for k, v in d.items()
            }

        def image(a: Any, side: int, kind: str = "image") -> Any:
            return None if a is None else resize_for_stage(kind, a, side)

        bs = stages[0].image_size
        base = [
            replace(
                r, conditions=at(bs, r.conditions), source=image(r.source, bs), mask=image(r.mask, bs, "mask")
            )
            for r in requests
        ]
        outs = stages[0].sample_batch(base, num_inference_steps=self.cfg.steps)
        images = []
        for r, o in zip(requests, outs, strict=True):
            per_stage = [
                StageInputs(
                    at(p.image_size, r.conditions),
                    guidance,
                    self.cfg.upsampler_steps,
                    image(r.source, p.image_size),
                    image(r.mask, p.image_size, "mask"),
                )
                for p in stages[1:]
            ]
            images.append(upsample(stages[1:], per_stage, o.images, r.seed)[-1].images[0])
        return images

    def measure(self, image: np.ndarray, row: Row, unit: Unit) -> dict[str, Any]:
        """Metric name -> value of one image: the benchmark's scene-parser score, or the fidelity
        of every representation the row was given (and of the mask, when it was one)."""
        from pipelines.evaluate.fidelity import condition_fidelity
        from pipelines.evaluate.scene_parser import parse_scene, scene_maps, score

        rec: dict[str, Any] = {}
        if unit.kind in ("bench", "bench-real"):
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
        if "mask" in unit.conditions:
            m = condition_fidelity("mask", row["image"], image, mask=row["mask"])
            rec["mask.max_abs_diff"] = float(m["max_abs_diff"])
        return rec
