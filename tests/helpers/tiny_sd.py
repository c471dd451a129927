"""A tiny random-init Stable Diffusion pipeline in the real diffusers format, for ``--base``.

``make_tiny_sd(dir)`` saves a ``StableDiffusionPipeline`` (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) as ``save_pretrained`` writes it:
a two-level ``UNet2DConditionModel`` (cross-attention at the first level, as SD's), an
``AutoencoderKL`` with SD's 4 latent channels and a ``vae_scale_factor`` of ``2 **
(levels - 1)``, a two-layer ``CLIPTextModel`` and a ``CLIPTokenizer`` over byte-level characters
plus a few whole words (context length ``max_length``). Everything loads offline through the same
code as a real Stable Diffusion 1.5 directory.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a an the red green blue yellow circle square star triangle ring on background to of left right".split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def make_tiny_tokenizer(directory: str | Path, max_length: int = 16) -> None:
    """A CLIPTokenizer whose words are single characters, or one id for each of ``WORDS``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in WORDS:  # merge left to right so each listed word becomes one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tmp = directory / "_src"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(directory))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


def make_tiny_sd(
    directory: str | Path,
    seed: int = 0,
    sample_size: int = 8,
    vae_levels: int = 3,
    cross_attention_dim: int = 32,
    max_length: int = 16,
) -> str:
    """Save a seeded random tiny SD pipeline into ``directory``; returns its path.

    Images are ``sample_size * 2 ** (vae_levels - 1)`` pixels (32 by default: 8×8 latents).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=(16,) * vae_levels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 2 ** (vae_levels - 1),
    )
    make_tiny_tokenizer(directory / "tokenizer", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory))
    return str(directory)
