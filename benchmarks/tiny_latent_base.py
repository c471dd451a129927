"""A tiny "pretrained" latent base, trained here on the synthetic set with captions only.

    python benchmarks/tiny_latent_base.py --output DIR [--resolution 64] [--images 4000]
        [--vae-steps 4000] [--unet-steps 30000] [--batch-size 32] [--lr 3e-4] [--threads N]
        [--seed 0] [--data-seed 1] [--smoke]

Stands in for Stable Diffusion where none can be downloaded: the same three parts, trained the
way Rombach et al. 2022 (LDM) train them, at a CPU size, saved as a diffusers
``StableDiffusionPipeline`` directory that ``--base DIR`` takes (``pipelines/conditions/backbone.py``).
Stages, each skipped when its record ``DIR/build/<stage>.json`` exists; the two trainings save a
checkpoint every ``--checkpoint-every`` steps and a killed run continues from the latest:

1. pool      ``--images`` synthetic 64 px images and captions, rendered once (``build/pool.npz``)
2. vae       an ``AutoencoderKL`` (SD's 4 latent channels, scale factor 4: 16×16 latents at 64 px),
             L1 + KL, then ``scaling_factor`` = 1 / std of its latents (LDM §4.3.2); held-out PSNR
3. text      a frozen random ``CLIPTextModel`` (SD's text encoder is frozen too) and a
             ``CLIPTokenizer`` with one token per word of the caption grammar
4. latents   the pool through the VAE (the posterior mean, as ``recompose decompose`` stores)
5. unet      a ``UNet2DConditionModel`` (cross-attention at 8×8, 4×4), ε-prediction under SD's
             scaled-linear schedule, 10% captions dropped to "" (for classifier-free guidance), EMA
6. pipeline  ``StableDiffusionPipeline.save_pretrained(DIR)`` with SD's ``DDIMScheduler`` config
7. samples   ``DIR/samples.png``: unseen captions, their render and three generations (CFG 5)

Prints one JSON object on stdout (every stage's record); progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.scene import COLOURS, RELATIONS, SHAPES, render_sample  # noqa: E402
from pipelines.errors import UserError  # noqa: E402
from pipelines.files import atomic_write, replace_dir, write_json  # noqa: E402

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger("base")
VAE_FACTOR = 4  # 2 ** (VAE levels - 1); see build_vae
MAX_LENGTH = 32  # tokens: the longest synthetic caption is 28 (words and commas) + BOS + EOS
WORDS = (
    *COLOURS,
    *SHAPES,
    *" ".join(RELATIONS).split(),
    "a",
    "an",
    "on",
    "which",
    "is",
    "gradient",
    "background",
)
SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


@dataclass(frozen=True)
class Settings:
    resolution: int = 64  # the synthetic set's side (the fine-tuning data's); a multiple of 8 (SD's pipeline)
    images: int = 4000  # pool size: ~0.5 min to render, 50 MB; one pass is 125 UNet steps
    data_seed: int = 1  # `recompose synth --seed 0` makes the fine-tuning set: new scenes to the base
    seed: int = 0  # weights, batches and noise
    vae_steps: int = 4000  # flat shapes are easy to encode: PSNR levels off after a few thousand
    vae_batch_size: int = 16
    vae_lr: float = 3e-4
    kl_weight: float = 1e-6  # SD's VAE (LDM App. G): a nearly deterministic autoencoder, latents kept bounded
    unet_steps: int = 30000  # ~2-3 h on 2 idle cores at batch 32 (240 passes over the pool)
    batch_size: int = 32
    lr: float = 3e-4  # higher than SD's 1e-4: a small model and batch
    warmup_steps: int = 250  # linear warm-up of both trainings: Adam's first steps are large
    ema_decay: float = 0.999  # horizon ~1000 steps of a 30000-step run; the saved UNet is the EMA
    caption_dropout: float = 0.1  # as SD: the empty prompt's model, which classifier-free guidance needs
    checkpoint_every: int = 500  # steps between checkpoints (~3 min of the UNet's training)
    held_images: int = 64  # held-out split images for the VAE's PSNR
    sample_captions: int = 6  # rows of samples.png
    sample_steps: int = 25  # DDIM steps
    guidance: float = 5.0  # the evaluation's caption-only guidance (pipelines/evaluate/config.py)


# --smoke: every stage in seconds, at the smallest resolution the scenes render well.
SMOKE = dict(
    resolution=32,
    images=8,
    vae_steps=2,
    vae_batch_size=2,
    unet_steps=2,
    batch_size=2,
    warmup_steps=1,
    checkpoint_every=1,
    held_images=2,
    sample_captions=2,
    sample_steps=2,
)


# -- models ---------------------------------------------------------------------------------------
def build_vae(resolution: int) -> AutoencoderKL:
    """SD's AutoencoderKL at a CPU size. Three levels give a scale factor of 4 (LDM-f4): 16×16×4
    latents at 64 px. At f = 8 a 64 px scene would be 8×8 latents, and its smallest objects (radius
    0.14 of the side, 9 px) two cells across: too coarse for the VAE to keep a star a star."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIPTextModel, 64 wide, frozen at its random init. CLIP's init keeps the embeddings
    at std 0.02 while each pre-LN layer adds O(1) prefix averages, so the states would be mostly
    averages; unit-scale embeddings keep each token's own word and position in its state."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    emb = getattr(model, "text_model", model).embeddings  # transformers 4 nests it in text_model
    with torch.no_grad():
        for table in (emb.token_embedding.weight, emb.position_embedding.weight):
            table /= table.std()
    return model.eval().requires_grad_(False)


def build_unet(resolution: int) -> UNet2DConditionModel:
    """SD's UNet layout at a CPU size (a batch-32 step well under a second on one core at 16×16):
    three levels of 32/64/128 channels, cross-attention at the two lower resolutions and the middle
    (SD 1.5: every level but the lowest; here the top level's 256 tokens would cost most, and an
    object already spans a few cells at 8×8). ``attention_head_dim`` is the head count in SD configs."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def make_tokenizer(directory: Path) -> None:
    """A CLIPTokenizer over CLIP's byte-level characters whose merges make each of ``WORDS`` one
    token. A word's merges are appended where the ones listed so far leave it (BPE applies merges by
    rank), so a word never stops halfway at another word's merge."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(WORDS):
        parts = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks.setdefault((parts[0], parts[1]), len(ranks))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = _bpe(parts, ranks)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=MAX_LENGTH)
    split = [w for w in WORDS if len(tok(w).input_ids) != 3]
    if split:
        raise RuntimeError(f"tokenizer: words not one token: {split}")
    tok.save_pretrained(str(directory))


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE over one word: merge the adjacent pair of lowest rank until none is listed."""
    while len(parts) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


# -- training -------------------------------------------------------------------------------------
def train(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    s: Settings,
    ckpt: Path,
    ema: EMAModel | None = None,
) -> dict:
    """AdamW with linear warm-up and gradient clipping (1.0) over ``steps``, resumed from ``ckpt``.
    Step k's batch and noise come from a generator seeded with (seed, k), so a resumed run draws
    exactly what an unbroken one would."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
        log.info("%s: resuming at step %d/%d", name, start, steps)
    recent: list[float] = []
    t0 = time.time()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / s.warmup_steps)
        loss = loss_fn(torch.Generator().manual_seed(s.seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.step(params)
        recent = [*recent[-99:], loss.item()]
        done = step + 1
        if done % s.checkpoint_every == 0 or done == steps:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done}
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_write(ckpt, lambda f, state=state: torch.save(state, f))
            rate = (done - start) / (time.time() - t0)
            left = (steps - done) / rate / 60
            log.info(
                f"{name}: step {done}/{steps}  loss {np.mean(recent):.4f}  {rate:.2f} steps/s  ~{left:.0f} min left"
            )
    return {"steps": steps, "resumed_from": start, "final_loss": float(np.mean(recent)) if recent else None}


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(B, R, R, 3) uint8 -> (B, 3, R, R) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _encode(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, 4, R/4, R/4) unscaled posterior means."""
    with torch.no_grad():
        parts = [vae.encode(_pixels(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([p.latent_dist.mean for p in parts])


def _save_dir(path: Path, save: Callable[[str], None]) -> None:
    """``save`` into a temporary directory beside ``path``, then put it at ``path`` in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(str(tmp))
    replace_dir(tmp, path)


# -- stages ---------------------------------------------------------------------------------------
def stage_pool(out: Path, s: Settings) -> dict:
    samples = [render_sample(s.data_seed, "train", i, s.resolution) for i in range(s.images)]
    images = np.stack([x.image for x in samples])
    captions = np.asarray([x.caption for x in samples])
    atomic_write(out / "build" / "pool.npz", lambda f: np.savez(f, images=images, captions=captions))
    return {"images": len(samples), "resolution": s.resolution, "split": "train", "data_seed": s.data_seed}


def stage_vae(out: Path, s: Settings) -> dict:
    """SD's first stage without its GAN and LPIPS terms: per image, L1 summed over pixels plus
    ``kl_weight`` × KL summed over latents (LDM App. G), divided by the pixel count."""
    pool = np.load(out / "build" / "pool.npz")["images"]
    torch.manual_seed(s.seed)
    vae = build_vae(s.resolution)

    def loss(g: torch.Generator) -> torch.Tensor:
        x = _pixels(pool[torch.randint(len(pool), (s.vae_batch_size,), generator=g).numpy()])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        return (rec - x).abs().mean() + s.kl_weight * posterior.kl().mean() / x[0].numel()

    record = train("vae", vae, loss, s.vae_steps, s.vae_lr, s, out / "build" / "vae-checkpoint.pt")
    vae.eval()
    std = float(_encode(vae, pool[:512]).std())  # LDM scales by the latents' std over a batch
    vae.register_to_config(scaling_factor=1.0 / std)
    held = np.stack(
        [render_sample(s.data_seed, "heldout", i, s.resolution).image for i in range(s.held_images)]
    )
    with torch.no_grad():
        rec = vae.decode(_encode(vae, held)).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    mse = ((rec - held.astype(np.float64)) ** 2).reshape(len(held), -1).mean(1)
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    _save_dir(out / "build" / "vae", vae.save_pretrained)
    params = sum(p.numel() for p in vae.parameters())
    return {
        **record,
        "parameters": params,
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "heldout_psnr_db": float(psnr.mean()),
    }


def stage_text(out: Path, s: Settings) -> dict:
    from transformers import CLIPTokenizer

    _save_dir(out / "build" / "tokenizer", lambda d: make_tokenizer(Path(d)))
    tok = CLIPTokenizer.from_pretrained(str(out / "build" / "tokenizer"))
    captions = np.load(out / "build" / "pool.npz")["captions"]
    longest = max(len(ids) for ids in tok(list(captions)).input_ids)
    if longest > MAX_LENGTH:
        raise RuntimeError(f"text: a pool caption is {longest} tokens, over the context of {MAX_LENGTH}")
    torch.manual_seed(s.seed)
    encoder = build_text_encoder(tok)
    _save_dir(out / "build" / "text_encoder", encoder.save_pretrained)
    params = sum(p.numel() for p in encoder.parameters())
    return {
        "vocab_size": len(tok),
        "max_length": MAX_LENGTH,
        "longest_pool_caption": longest,
        "parameters": params,
    }


def stage_latents(out: Path, s: Settings) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(out / "build" / "vae")).eval()
    latents = _encode(vae, np.load(out / "build" / "pool.npz")["images"]).numpy()
    atomic_write(out / "build" / "latents.npy", lambda f: np.save(f, latents))
    return {"shape": list(latents.shape), "scaled_std": float(latents.std() * vae.config.scaling_factor)}


def stage_unet(out: Path, s: Settings) -> dict:
    """Text-to-image as SD: ε-MSE on scaled latents under the scaled-linear DDPM schedule, the
    frozen text encoder's last hidden states as context, captions dropped to ""."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.conditions.backbone import BaseModel

    build = out / "build"
    scale = json.loads((build / "vae.json").read_text())["scaling_factor"]
    latents = torch.from_numpy(np.load(build / "latents.npy")) * scale
    text = BaseModel(
        path=build,
        text_encoder=CLIPTextModel.from_pretrained(str(build / "text_encoder")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(build / "tokenizer")),
    )
    captions = list(np.load(build / "pool.npz")["captions"])
    states = torch.cat([text.encode_text(captions[i : i + 256])[0] for i in range(0, len(captions), 256)])
    empty = text.encode_text([""])[0]
    noise_schedule = DDPMScheduler(**SD_SCHEDULE)
    torch.manual_seed(s.seed)
    unet = build_unet(s.resolution)
    ema = EMAModel(unet.parameters(), decay=s.ema_decay, use_ema_warmup=True)

    def loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(latents), (s.batch_size,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(s.batch_size, generator=g) < s.caption_dropout
        context = torch.where(drop[:, None, None], empty, states[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (s.batch_size,), generator=g)
        return F.mse_loss(unet(noise_schedule.add_noise(x0, noise, t), t, context).sample, noise)

    record = train("unet", unet, loss, s.unet_steps, s.lr, s, build / "unet-checkpoint.pt", ema)
    ema.copy_to(unet.parameters())
    _save_dir(build / "unet", unet.save_pretrained)
    return {**record, "parameters": sum(p.numel() for p in unet.parameters()), "ema_decay": s.ema_decay}


def stage_pipeline(out: Path, s: Settings) -> dict:
    """The parts as one SD pipeline, written beside build/ (components first, model_index.json last)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    build = out / "build"
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_pretrained(str(build / "unet")),
        vae=AutoencoderKL.from_pretrained(str(build / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(build / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(build / "tokenizer")),
        # SD 1.5's inference scheduler config
        scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = build / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        replace_dir(tmp / name, out / name)
    os.replace(tmp / "model_index.json", out / "model_index.json")
    shutil.rmtree(tmp)
    return {"directory": str(out), "components": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]}


def stage_samples(out: Path, s: Settings) -> dict:
    """Rows: an unseen caption, the generator's render of it, three generations (CFG)."""
    from diffusers import StableDiffusionPipeline

    from pipelines.diffusion.pictures import MIN_TILE, layout, text_tile
    from pipelines.files import encode_png, write_bytes

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    scenes = [
        render_sample(s.data_seed, "train", s.images + i, s.resolution) for i in range(s.sample_captions)
    ]
    images = pipe(
        [x.caption for x in scenes],
        height=s.resolution,
        width=s.resolution,
        num_inference_steps=s.sample_steps,
        guidance_scale=s.guidance,
        num_images_per_prompt=3,
        generator=torch.Generator().manual_seed(s.seed),
        output_type="np",
    ).images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    rows = [
        [("caption", text_tile(x.caption, MIN_TILE)), ("render", x.image)]
        + [(f"sample {j}", images[3 * i + j]) for j in range(3)]
        for i, x in enumerate(scenes)
    ]
    write_bytes(encode_png(layout(rows, MIN_TILE)), out / "samples.png")
    return {"file": str(out / "samples.png"), "captions": [x.caption for x in scenes], "guidance": s.guidance}


# -- driver ---------------------------------------------------------------------------------------
STAGES: dict[str, Callable[[Path, Settings], dict]] = {
    "pool": stage_pool,
    "vae": stage_vae,
    "text": stage_text,
    "latents": stage_latents,
    "unet": stage_unet,
    "pipeline": stage_pipeline,
    "samples": stage_samples,
}


def build_base(out: Path, s: Settings) -> dict:
    """Run every stage not done yet; returns each stage's record and which were skipped."""
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(s)
    if (build / "settings.json").exists():
        before = json.loads((build / "settings.json").read_text())
        differ = [f"{k} {before.get(k)} there, {v} now" for k, v in settings.items() if before.get(k) != v]
        if differ:
            raise UserError(
                f"--output {out}: built with other settings ({'; '.join(differ)}); resume it with its own"
            )
    else:
        write_json(settings, build / "settings.json")
    summary: dict = {"benchmark": "tiny_latent_base", "output": str(out), "settings": settings, "skipped": []}
    for name, stage in STAGES.items():
        record = build / f"{name}.json"
        if record.exists():
            summary["skipped"].append(name)
        else:
            log.info("stage %s", name)
            t0 = time.time()
            result = stage(out, s)
            write_json({**result, "seconds": round(time.time() - t0, 1)}, record)
        summary[name] = json.loads(record.read_text())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="pipeline directory (new, or a run to resume)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--images", type=int, help="synthetic images in the training pool")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--unet-steps", type=int)
    p.add_argument("--batch-size", type=int, help="UNet batch")
    p.add_argument("--vae-batch-size", type=int)
    p.add_argument("--lr", type=float, help="UNet AdamW learning rate")
    p.add_argument("--vae-lr", type=float)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--data-seed", type=int)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    p.add_argument("--smoke", action="store_true", help="every stage in seconds (32 px, 2 steps)")
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="[base] %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.pop("threads") or len(os.sched_getaffinity(0)))
    out, smoke = args.pop("output"), args.pop("smoke")
    try:
        s = Settings(**{**(SMOKE if smoke else {}), **{k: v for k, v in args.items() if v is not None}})
        if s.resolution % 8:
            raise UserError(f"--resolution {s.resolution}: SD's pipeline takes multiples of 8")
        summary = build_base(out, s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
