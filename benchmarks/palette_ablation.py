"""How fast does the palette learn to steer the tiny model? A training ablation, not a speed benchmark.

    python benchmarks/palette_ablation.py --data runs/decomposed --steps 800 --name base
    python benchmarks/palette_ablation.py --data runs/decomposed --steps 800 --name palette-only \\
        --variant '{"dropout": {"p_keep_all": 0, "per_condition": {"caption": 1, "semantics": 1, "palette": 0,
                    "sketch": 1, "instances": 1, "depth": 1, "intensity": 1, "mask": 1}}}'

One process, no Ray: ``configs/train-laptop.yaml``'s model, optimiser, loss weighting, augmentation
and condition dropout (``--variant`` merges into that config: ``model.overrides``, ``dropout``),
``--steps`` steps of ``2 × optim.batch_size`` random rows, then the EMA weights sample the first
``--rows`` rows palette-only (guidance 3 and 5) and unconditionally, same seeds, and the palette
re-extracted from each sample is compared with the one given (χ², as ``recompose evaluate``).
Prints one JSON line; the ratio to the unconditional floor is the evaluate quality bar's measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import load_config  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a `recompose decompose` output (the synthetic set)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--rows", type=int, default=24, help="evaluation rows (the first of the data)")
    p.add_argument("--name", default="base")
    p.add_argument("--variant", default="{}", help="JSON merged into configs/train-laptop.yaml")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from models import ComposerModel, ConditionDropout
    from models.objective import diffusion_loss
    from pipelines.conditions.palette import chi2
    from pipelines.data.augment import AugmentConfig
    from pipelines.data.batches import make_recipe, open_data, prepare_batch
    from pipelines.data.decomposer import ImageDecomposer
    from pipelines.diffusion.pipeline import ComposerPipeline
    from pipelines.diffusion.schedulers import default_scheduler
    from pipelines.train.loop import batch_inputs
    from pipelines.train.run import model_arguments

    variant = json.loads(args.variant)
    values = {**variant, "data": args.data, "output": "unused"}
    cfg = load_config(TrainConfig, ROOT / "configs/train-laptop.yaml", values)
    spec = open_data(args.data)
    torch.manual_seed(0)
    model = ComposerModel(**model_arguments(cfg, spec))
    recipe = make_recipe(spec, model.config, tuple(spec.conditions), cfg.augment)
    table = pa.concat_tables([pq.read_table(f, columns=list(recipe.columns)) for f in spec.files])
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    lrs = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.optim.warmup_steps)
    ema = EMAModel(model.parameters(), decay=cfg.optim.ema_decay, use_ema_warmup=cfg.optim.ema_warmup)
    scheduler, dropout = default_scheduler(), ConditionDropout(cfg.dropout)
    gen, rng = torch.Generator().manual_seed(1), np.random.default_rng(2)
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows = table.take(rng.choice(table.num_rows, 2 * cfg.optim.batch_size, replace=False))
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in prepare_batch(rows, recipe).items()}
        x0, cond, available = batch_inputs(model, batch, recipe)
        loss = diffusion_loss(
            model, scheduler, x0, cond, dropout(available, gen), gen,
            weighting=cfg.optim.loss_weighting, max_weight=cfg.optim.max_loss_weight,
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or float("inf"))
        opt.step()
        lrs.step()
        ema.step(model.parameters())
        if step % 100 == 0:
            print(
                f"[{args.name}] step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
            )
    train_s = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    model.eval()
    pipe = ComposerPipeline(unet=model, scheduler=default_scheduler(), decompose=spec.settings)
    pipe.set_progress_bar_config(disable=True)
    dec = ImageDecomposer.for_pipeline(pipe)
    full_frame = AugmentConfig(crop_scale=(1.0, 1.0), random_intensity=False)
    ev = make_recipe(spec, model.config, ("palette",), full_frame)
    palettes = prepare_batch(pq.read_table(spec.files[0], columns=list(ev.columns)).slice(0, args.rows), ev)
    palettes = np.asarray(palettes["palette"], np.float32)

    def score(conditions, guidance: float, i: int) -> float:
        x = np.asarray(pipe(conditions, guidance=guidance, num_inference_steps=25, seed=i).images[0])
        return float(chi2(palettes[i], dec.decompose(x, ["palette"])["palette"]))

    n = len(palettes)
    res = {"none": np.mean([score({}, 1.0, i) for i in range(n)])}
    for g in (3.0, 5.0):
        res[f"palette@{g:g}"] = np.mean([score({"palette": palettes[i]}, g, i) for i in range(n)])
    out = {
        "name": args.name,
        "steps": args.steps,
        "variant": variant,
        "rows": n,
        "train_s": round(train_s, 1),
        **{k: round(float(v), 3) for k, v in res.items()},
        **{f"ratio@{g:g}": round(float(res[f"palette@{g:g}"] / res["none"]), 3) for g in (3.0, 5.0)},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
