"""The web page's example images: six scenes of the built-in synthetic set, shipped as PNGs.

``pipelines/serve/static/examples/`` holds them with ``examples.json``; the ingress serves both
under ``/examples/`` (only the files the manifest lists). They are written by the synthetic
set's own renderer (``pipelines.data.scene``: exact pixels, true captions), so they regenerate
exactly::

    python -m pipelines.serve.examples [OUT_DIR]     # default: the shipped folder

The choice: the first three scenes of split ``train`` (dataset seed 0), and from split
``heldout`` (each scene holds a colour-shape pair never seen in training) the first scene with
one, two and three objects, which between them have plain and gradient backgrounds.

Beside each image its true ``instances`` and ``depth`` maps (the synthetic set's ground truth, as
the decomposition job turns it into those conditions for training: ids numbered by the
extractor's convention, drawn in ``colourize_instances``' colours on black; depth gray, 255 =
nearest), listed under the entry's ``maps``. A served model that can only cluster colours
(instances) or has no depth model would otherwise condition on what it never saw in training —
a gradient background clusters into stripes — so the page sends these maps for an example.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipelines.data.preview import colourize_instances
from pipelines.data.scene import MAX_OBJECTS, render_sample, sample_scene
from pipelines.files import atomic_write, encode_png

EXAMPLES_DIR = Path(__file__).parent / "static" / "examples"
MANIFEST = "examples.json"
FORMAT = "recompose.serve-examples/1"
RESOLUTION = 64
SEED = 0  # the synthetic dataset's seed
TRAIN_COUNT = 3
MAP_NAMES = ("instances", "depth")  # the example's true maps shipped beside it


def choose() -> list[tuple[str, int]]:
    """(split, index) of each example, in page order."""
    chosen = [("train", i) for i in range(TRAIN_COUNT)]
    index = 0
    for n in range(1, MAX_OBJECTS + 1):
        while len(sample_scene(SEED, "heldout", index, RESOLUTION)["objects"]) != n:
            index += 1
        chosen.append(("heldout", index))
        index = 0
    return chosen


def true_maps(image: np.ndarray, instances: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    """The ``instances`` (ids) and ``depth`` conditions of a synthetic image from its ground truth,
    by the decomposition job's own extractors (as the training shards hold them)."""
    from pipelines.conditions import get_extractor
    from pipelines.conditions.depth import DepthConfig
    from pipelines.conditions.instances import InstancesConfig

    batch = {
        "image": image[None],
        "has_gt": np.ones(1, bool),
        "gt_instances": instances[None],
        "gt_depth": depth[None],
    }
    out = {}
    for name, cfg in (("instances", InstancesConfig()), ("depth", DepthConfig())):
        extractor = get_extractor(name)(cfg, RESOLUTION, has_ground_truth=True)
        out[name] = extractor.extract(batch)[name][0]
    return out


def manifest_and_files() -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and {file name: PNG bytes}, computed (nothing is written)."""
    entries, files = [], {}
    for split, index in choose():
        s = render_sample(SEED, split, index, RESOLUTION)  # type: ignore[arg-type]
        name = f"{split}-{index:05d}.png"
        files[name] = encode_png(s.image)
        maps = true_maps(s.image, s.instances, s.depth)
        map_files = {m: f"{split}-{index:05d}.{m}.png" for m in MAP_NAMES}
        files[map_files["instances"]] = encode_png(colourize_instances(maps["instances"]))
        files[map_files["depth"]] = encode_png(maps["depth"])
        entries.append(
            {
                "file": name,
                "caption": s.caption,
                "split": split,
                "seed": SEED,
                "index": index,
                "objects": len(s.scene["objects"]),
                "background": s.scene["background"]["kind"],
                "maps": map_files,
            }
        )
    manifest = {"format": FORMAT, "resolution": RESOLUTION, "examples": entries}
    return manifest, files


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    def write(f: IO[bytes]) -> None:
        os.fchmod(f.fileno(), 0o644)  # shipped files: readable by whoever serves them
        f.write(data)

    if not path.exists() or path.read_bytes() != data:
        atomic_write(path, write)


def write_examples(out_dir: str | Path = EXAMPLES_DIR) -> dict[str, Any]:
    """Write the example PNGs and ``examples.json`` to ``out_dir``; returns the manifest.
    Files whose bytes are already right are left alone; other files in ``out_dir`` are kept."""
    out = Path(out_dir)
    manifest, files = manifest_and_files()
    for name, data in files.items():
        _write(out / name, data)
    _write(out / MANIFEST, manifest_bytes(manifest))
    return manifest


def load_manifest(out_dir: str | Path = EXAMPLES_DIR) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def example_files(out_dir: str | Path = EXAMPLES_DIR) -> dict[str, Path]:
    """{file name: path} of the files the manifest lists (images and their maps; plain names only),
    manifest included: what the ingress may serve."""
    out = Path(out_dir)
    names = []
    for e in load_manifest(out)["examples"]:
        maps = e.get("maps")
        names += [e["file"], *(maps.values() if isinstance(maps, dict) else ())]
    files = {MANIFEST: out / MANIFEST}
    for name in names:
        if isinstance(name, str) and name == Path(name).name and not name.startswith("."):
            files[name] = out / name
    return files


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES_DIR
    written = write_examples(target)
    print(f"{len(written['examples'])} examples in {target}")
