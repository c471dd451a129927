"""At which noise level does a caption-only sample lose the named shapes? A probe of a saved
pipeline: each caption's own render is noised to a level t (SDEdit, Meng et al. 2022) and
denoised with the caption alone through the DDIM steps at or below t.

    python benchmarks/caption_levels.py PIPELINE_DIR N LEVELS [GUIDANCE] [STEPS] [OUT_DIR]
    python benchmarks/caption_levels.py pipelines/diffusion/reference 32 999,900,800,700,500,300 3

The first N seen benchmark captions (the evaluation's caption seed, as ``caption_probe.py``).
From level 999 (the schedule's last) this is ``caption_probe.py``, pure noise: the caption must
set everything. From a lower level
the render's layout survives the noise and the model has only to finish it, so the level where
the scene parser's per-object shape accuracy falls says which part of the noise schedule a model
fails to learn: training weight, an expert for that range (``--noise-range``) or capacity there.
Prints one JSON line per level; saves ``caption-levels-g<scale>.png`` (top: the renders, then one
row of samples per level, highest noise first).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipelines.diffusion.pipeline as pipeline_module  # noqa: E402
from benchmarks.caption_probe import read_back, seen_rows  # noqa: E402
from pipelines.diffusion.inputs import image_to_tensor  # noqa: E402
from pipelines.diffusion.loading import load_pipeline  # noqa: E402
from pipelines.diffusion.requests import SampleRequest  # noqa: E402
from pipelines.diffusion.sampling import guided_noise  # noqa: E402


@contextlib.contextmanager
def from_level(x0: torch.Tensor, level: int):
    """Within the block, the pipeline's sampling loop starts from ``x0`` (B, C, S, S) noised to
    the first of its timesteps at or below ``level`` with the request's own noise, and runs only
    those timesteps; the pipeline's encoding of conditions and guidance are untouched. The loop
    is ``sampling.denoise``'s over the kept timesteps (no masked source: these requests have none);
    truncating the loop is a probe's need, so the shared sampler does not carry it."""

    def denoise(model, scheduler, x, encoded, guidance, num_inference_steps, known=None, progress=iter):
        scheduler.set_timesteps(num_inference_steps, device=x.device)
        steps = scheduler.timesteps[scheduler.timesteps <= level]
        if len(steps) == 0:
            raise ValueError(f"level {level} is below every sampling timestep")
        if level < scheduler.config.num_train_timesteps - 1:  # the last level: pure noise, as caption_probe
            x = scheduler.add_noise(x0.to(x.device, x.dtype), x, steps[:1])
        for i, t in enumerate(steps):
            eps = guided_noise(
                model, scheduler.scale_model_input(x, t), t, encoded, guidance, (i, len(steps))
            )
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x

    with mock.patch.object(pipeline_module, "denoise", denoise):
        yield


def main(model: str, n: int, levels: list[int], guidance: float, steps: int, out: Path) -> list[dict]:
    torch.set_num_threads(2)
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    rows = seen_rows(n, pipe.image_size)
    out.mkdir(parents=True, exist_ok=True)
    lines, pictures = [], [np.concatenate([r.image for r in rows[:16]], 1)]
    for level in levels:
        images = []
        for b in range(0, n, 8):
            chunk = rows[b : b + 8]
            x0 = image_to_tensor(np.stack([r.image for r in chunk]))
            requests = [
                SampleRequest({"text": r.caption}, guidance=guidance, seed=b + i) for i, r in enumerate(chunk)
            ]
            with from_level(x0, level):
                images += [
                    np.asarray(o.images[0]) for o in pipe.sample_batch(requests, num_inference_steps=steps)
                ]
        line = {"level": level, "guidance": guidance, "n_images": len(images), **read_back(images, rows)[0]}
        print(json.dumps(line), flush=True)
        lines.append(line)
        pictures.append(np.concatenate(images[:16], 1))
    grid = np.concatenate(pictures, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        out / f"caption-levels-g{guidance:g}.png"
    )
    return lines


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) < 3:
        sys.exit(__doc__)
    main(
        a[0],
        int(a[1]),
        [int(v) for v in a[2].split(",")],
        float(a[3]) if len(a) > 3 else 3.0,
        int(a[4]) if len(a) > 4 else 25,
        Path(a[5]) if len(a) > 5 else Path("."),
    )
