"""Decomposition speed: the no-weights CPU extractors against decoding and against a naive loop.

    python benchmarks/decompose.py [--count 256] [--resolution 256] [--repeats 3] [--no-ray]

Same encoded images (512×384 JPEGs: half synthetic scenes, half noisy photo-like textures), same
run, one process, one core (the like-for-like figures the goals are judged on):

  (a) decode + resize only        — ``decode_image`` per row, as the job's decode stage does
  (b) the no-weights CPU set      — (a) then palette, sketch (Canny), intensity and instances
                                    (colour clustering), batched as the job's actor stages run them
  (c) naive per-image loop        — what ControlNet's annotator scripts do: PIL open/resize, then
                                    one call per image per representation: controlnet_aux
                                    ``CannyDetector()(img)``, the palette as the authors' per-image
                                    code computes it (skimage Lab, distances to all 156 centres,
                                    histogram, smoothing), PIL ``convert("L")``, and per-image
                                    scikit-learn k-means + skimage labels

(c) does the same work as (b): Canny at the stored resolution (``detect_resolution`` =
``image_resolution`` = R) and k-means at the library's clustering size
(``instances.cluster_resolution``, area-resized, labels scaled back to R). With controlnet_aux's
own defaults instead (Canny detected at 512 px and resized down, k-means on all R×R pixels) the
loop does several times more work; that variant is reported too, as ``c_naive_defaults_ips``,
but not judged, since its ratio would credit (b) with work it does not do.

Goals (issue "Decompose"): (b) ≥ 0.5 × (a) and (b) ≥ 3 × (c). Also reported, not judged: the
end-to-end Ray Data job (``run_decompose``) on a local 2-CPU Ray, which adds its start-up and
scheduling on top, and a per-representation breakdown (ms per image, on decoded images) of (b)
and (c). Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from pipelines.conditions.instances import InstancesConfig, InstancesExtractor  # noqa: E402
from pipelines.conditions.intensity import IntensityConfig, IntensityExtractor  # noqa: E402
from pipelines.conditions.palette import NUM_BINS, PaletteConfig, PaletteExtractor, bin_centres  # noqa: E402
from pipelines.conditions.sketch import SketchConfig, SketchExtractor  # noqa: E402
from pipelines.data.decode import DecodeConfig, decode_image  # noqa: E402
from pipelines.data.synth import render_sample  # noqa: E402
from pipelines.log import configure  # noqa: E402

log = logging.getLogger("bench")


def make_images(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:384, 0:512] / 512.0
    blobs = []
    for i in range(count):
        if i % 2:
            a = np.asarray(Image.fromarray(render_sample(seed, "train", i, 384).image).resize((512, 384)))
        else:
            f = rng.uniform(2, 9, 3)
            base = np.stack([np.sin(xx * f[0] + i), np.cos(yy * f[1]), np.sin((xx + yy) * f[2])], -1)
            a = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (384, 512, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# -- (a) and (b): the library --------------------------------------------------------------------


def decode_all(blobs: list[bytes], r: int) -> np.ndarray:
    cfg = DecodeConfig()
    return np.stack([decode_image(b, r, cfg) for b in blobs])


def cpu_extractors(r: int) -> list:
    return [
        PaletteExtractor(PaletteConfig(), r),
        SketchExtractor(SketchConfig(method="canny"), r),
        IntensityExtractor(IntensityConfig(), r),
        InstancesExtractor(InstancesConfig(method="cluster"), r),
    ]


def extract_all(images: np.ndarray, extractors: list, batch_size: int | None) -> None:
    """Each extractor over all images in batches of ``batch_size`` (None: its configured size, as the job)."""
    n = len(images)
    for e in extractors:
        bs = batch_size or e.config.batch_size
        for s in range(0, n, bs):
            img = images[s : s + bs]
            e({"image": img, "text": np.array([""] * len(img), object), "has_gt": np.zeros(len(img), bool)})


# -- (c): the naive per-image loop ---------------------------------------------------------------


class NaivePalette:
    """The authors' per-image palette: Lab conversion, distances to all centres, histogram, smoothing.

    Their ``Palette.histogram`` takes the argmin of scikit-learn's squared ``euclidean_distances``;
    ``cdist``'s argmin is the same bin, and both cost ~35 ms per 256² image on the reference VM.
    """

    def __init__(self, sigma: float = 10.0):
        c = bin_centres().astype(np.float64)
        d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigma**2))
        self.centres, self.smooth = c, w / w.sum(1, keepdims=True)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from scipy.spatial.distance import cdist
        from skimage.color import rgb2lab

        lab = rgb2lab(rgb).reshape(-1, 3)
        bins = cdist(lab, self.centres).argmin(1)
        hist = np.bincount(bins, minlength=NUM_BINS) / len(bins)
        out = (self.smooth * hist).sum(1)
        return out / out.sum()


class Naive:
    """(c): one image at a time, one call per representation, as ControlNet's annotator scripts.

    ``detect``: the side controlnet_aux's Canny runs at (R: like for like; 512: its default).
    ``cluster_size``: the side k-means runs at (the library's ``cluster_resolution``: like for
    like; R: every pixel); the labels are scaled back to R with nearest neighbour, as the library.
    """

    def __init__(self, r: int, detect: int, cluster_size: int):
        from controlnet_aux import CannyDetector

        self.r, self.detect, self.cluster_size = r, detect, cluster_size
        self.canny, self.palette_fn = CannyDetector(), NaivePalette()

    def decode(self, blob: bytes) -> Image.Image:
        r = self.r
        im = Image.open(io.BytesIO(blob)).convert("RGB")
        w, h = im.size
        s = r / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        left, top = (im.width - r) // 2, (im.height - r) // 2
        return im.crop((left, top, left + r, top + r))

    def sketch(self, im: Image.Image) -> np.ndarray:
        d = self.detect
        edges = self.canny(im, low_threshold=100, high_threshold=200, detect_resolution=d, image_resolution=d)
        if edges.size != (self.r, self.r):
            edges = edges.resize((self.r, self.r))
        return np.asarray(edges)

    def palette(self, im: Image.Image) -> np.ndarray:
        return self.palette_fn(np.asarray(im))

    def intensity(self, im: Image.Image) -> np.ndarray:
        return np.asarray(im.convert("L"))

    def instances(self, im: Image.Image) -> np.ndarray:
        import cv2
        from skimage.measure import label
        from sklearn.cluster import KMeans

        rgb, c = np.asarray(im), self.cluster_size
        if c < self.r:
            rgb = cv2.resize(rgb, (c, c), interpolation=cv2.INTER_AREA)
        km = KMeans(n_clusters=8, n_init=1, max_iter=10, random_state=0)
        km.fit(rgb.reshape(-1, 3).astype(np.float32))
        regions = label(km.labels_.reshape(rgb.shape[:2]) + 1, background=0, connectivity=1)
        if c < self.r:
            regions = cv2.resize(regions.astype(np.int32), (self.r, self.r), interpolation=cv2.INTER_NEAREST)
        return regions

    def __call__(self, blobs: list[bytes]) -> None:
        for b in blobs:
            im = self.decode(b)
            self.sketch(im)
            self.palette(im)
            self.intensity(im)
            self.instances(im)


def breakdown(
    blobs: list[bytes], r: int, exts: list, naive: Naive, batch_size: int | None, repeats: int
) -> dict:
    """ms per image of each representation alone, (b) batched and (c) per image, on decoded images."""
    images = decode_all(blobs, r)
    pil = [naive.decode(b) for b in blobs]
    n = len(blobs)
    out: dict[str, dict[str, float]] = {"b": {}, "c": {}}
    out["b"]["decode_resize"] = best_of(lambda: decode_all(blobs, r), repeats)
    out["c"]["decode_resize"] = best_of(lambda: [naive.decode(b) for b in blobs], repeats)
    for e in exts:
        out["b"][e.name] = best_of(lambda e=e: extract_all(images, [e], batch_size), repeats)
        fn = getattr(naive, e.name)
        out["c"][e.name] = best_of(lambda fn=fn: [fn(im) for im in pil], repeats)
    return {k: {name: round(t / n * 1e3, 3) for name, t in v.items()} for k, v in out.items()}


# -- the Ray job, end to end ---------------------------------------------------------------------


def ray_job(blobs: list[bytes], r: int, conditions: str) -> float:
    from pipelines.config import load_config
    from pipelines.decompose.config import DecomposeConfig
    from pipelines.decompose.job import run_decompose

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i, b in enumerate(blobs):
            (src / f"{i:05d}.jpg").write_bytes(b)
        values = {
            "input": str(src),
            "output": str(Path(tmp) / "out"),
            "conditions": conditions,
            "resolution": r,
            "progress": False,
            "instances.method": "cluster",
            "shard_size": 128,
        }
        s = run_decompose(load_config(DecomposeConfig, values=values))
        return s.inputs / s.elapsed_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: each extractor's own")
    p.add_argument("--naive-count", type=int, default=64, help="images for (c), the slow baseline")
    p.add_argument("--no-ray", action="store_true", help="skip the end-to-end Ray job figures")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    configure(-1)  # the job's own lines are not the benchmark's: warnings only
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by scikit-learn's OpenMP when (c) imports it
    import cv2
    import torch

    # One core for every path, a fair comparison: OpenCV (used by the library and by
    # controlnet_aux alike) otherwise spreads resizes and colour conversions over all cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    r, n = args.resolution, args.count
    log.info(f"making {n} JPEGs (512x384)")
    blobs = make_images(n)

    exts = cpu_extractors(r)
    # Warm-up: imports, and the palette's exact colour table (loaded from the per-machine cache,
    # or computed once, ~3 s, on a machine that has none).
    extract_all(decode_all(blobs[:8], r), exts, args.batch_size)
    log.info("(a) decode + resize")
    ta = best_of(lambda: decode_all(blobs, r), args.repeats)
    log.info("(b) decode + palette, sketch, intensity, instances")
    tb = best_of(lambda: extract_all(decode_all(blobs, r), exts, args.batch_size), args.repeats)

    nc = min(args.naive_count, n)
    cluster_size = min(r, InstancesConfig().cluster_resolution)
    naive = Naive(r, detect=r, cluster_size=cluster_size)
    naive_defaults = Naive(r, detect=512, cluster_size=r)
    naive(blobs[:2])
    naive_defaults(blobs[:2])
    log.info(f"(c) naive per-image loop on {nc} images, like for like and with controlnet_aux's defaults")
    tc = best_of(lambda: naive(blobs[:nc]), max(1, args.repeats - 1))
    tc_defaults = best_of(lambda: naive_defaults(blobs[:nc]), max(1, args.repeats - 1))
    log.info(f"per-representation breakdown on {nc} images")
    parts = breakdown(blobs[:nc], r, exts, naive, args.batch_size, max(1, args.repeats - 1))

    a, b, c, c_def = n / ta, n / tb, nc / tc, nc / tc_defaults
    out = {
        "benchmark": "decompose",
        "machine": {"cpu": cpu_name(), "cores_used": 1, "python": platform.python_version()},
        "count": n,
        "resolution": r,
        "source": "512x384 JPEG q90",
        "judged_on": "a, b, c: in-process, one core, same images; c at the same working sizes as b",
        "a_decode_resize_ips": round(a, 1),
        "b_cpu_extractors_ips": round(b, 1),
        "c_naive_controlnet_aux_ips": round(c, 1),
        "ratio_b_over_a": round(b / a, 3),
        "ratio_b_over_c": round(b / c, 2),
        "goal_b_over_a": 0.5,
        "goal_b_over_c": 3.0,
        "goals_met": {"b_over_a": b / a >= 0.5, "b_over_c": b / c >= 3.0},
        "c_naive_defaults_ips": round(c_def, 1),
        "ratio_b_over_c_defaults": round(b / c_def, 2),
        "c_settings": {
            "like_for_like": {"canny_detect_resolution": r, "kmeans_side": cluster_size},
            "defaults": {"canny_detect_resolution": 512, "kmeans_side": r},
        },
        "b_batch_sizes": {e.name: args.batch_size or e.config.batch_size for e in exts},
        "ms_per_image": parts,
    }
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        log.info("Ray job: decode + intensity")
        job_a = statistics.median(ray_job(blobs, r, "intensity") for _ in range(2))
        log.info("Ray job: decode + palette, sketch, intensity, instances")
        job_b = statistics.median(ray_job(blobs, r, "palette,sketch,intensity,instances") for _ in range(2))
        ray.shutdown()
        out["ray_job_2cpu"] = {
            "decode_intensity_ips": round(job_a, 1),
            "cpu_extractors_ips": round(job_b, 1),
            "note": "end to end incl. pipeline start-up, 2 CPUs, not judged",
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
