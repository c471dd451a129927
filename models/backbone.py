"""A pretrained Stable Diffusion–family UNet turned into Composer's UNet, exactly the base at step 0.

ControlNet, T2I-Adapter and IP-Adapter reach quality by adapting a pretrained latent backbone;
here all eight of Composer's representations enter one such backbone, each through a path that
contributes exactly zero until it is trained:

- local maps (sketch, instances, depth, intensity, mask): ``LocalConditioner`` features at the
  latent resolution go through ``ZeroConvIn``'s zero-initialised convolution, added to the base's
  own ``conv_in`` output (equivalent to zero-initialised extra input channels, but a separate
  module, so the adapter mode trains it while the base stays frozen);
- semantics, palette (and the caption's pooled vector, and the presence flags): the
  ``GlobalConditioner`` embedding through a zero-initialised linear layer, added to the timestep
  embedding (the UNet's ``class_embedding`` set to identity);
- semantics and palette tokens: ``ExtraTokensAttnProcessor`` on every cross-attention layer attends
  to them separately from the caption tokens, with a zero-initialised value projection, and adds
  the result (IP-Adapter's decoupled cross-attention, Ye et al. 2023, with a zero start);
- the caption: the base's own text-encoder states, passed to cross-attention unchanged; an absent
  caption is the base's embedding of the empty prompt, as in Stable Diffusion's own
  classifier-free guidance.

Only SD 1.x / 2.x UNets (``UNet2DConditionModel`` without added conditioning) are taken;
``check_base_unet`` says why another one is not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from models.paint import cross_attention

# UNet2DConditionModel settings that add inputs this module does not build (SDXL's text_time,
# image-conditioned UNets, class-conditioned upscalers): refused with their name.
_UNSUPPORTED = {
    "addition_embed_type": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "time_cond_proj_dim": None,
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def check_base_unet(config: dict[str, Any]) -> None:
    """Refuses a UNet config this construction cannot keep exact, naming the setting."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(
            f"the base UNet is a {config['_class_name']}; recompose adapts UNet2DConditionModel "
            "(Stable Diffusion 1.x / 2.x)"
        )
    for key, want in _UNSUPPORTED.items():
        if config.get(key, want) != want:
            hint = (
                " (SDXL: its text_time conditioning is not supported yet)"
                if key == "addition_embed_type"
                else ""
            )
            raise ValueError(
                f"the base UNet sets {key}={config[key]!r}{hint}; recompose adapts UNets without it "
                "(Stable Diffusion 1.x / 2.x)"
            )
    if not config.get("cross_attention_dim"):
        raise ValueError("the base UNet has no cross_attention_dim; a text-conditioned UNet is needed")


class ZeroConvIn(nn.Module):
    """The base ``conv_in`` on the first ``channels`` inputs plus a zero-initialised convolution of
    the rest (the local-condition features): exactly the base's ``conv_in`` at initialisation."""

    def __init__(self, base: nn.Conv2d, local_channels: int):
        super().__init__()
        self.base = base
        self.channels = base.in_channels
        self.local = nn.Conv2d(local_channels, base.out_channels, 3, padding=1)
        nn.init.zeros_(self.local.weight)
        nn.init.zeros_(self.local.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x[:, : self.channels]) + self.local(x[:, self.channels :])


class ExtraTokensAttnProcessor(nn.Module):
    """Cross-attention to the caption tokens as the base does, plus a separate attention to the
    last ``n_extra`` context tokens (semantics and palette) through new key/value projections whose
    value starts at zero, so the layer's output is the base's until they are trained."""

    def __init__(self, cross_dim: int, inner_dim: int, n_extra: int):
        super().__init__()
        self.n_extra = n_extra
        self.painting: Any = None  # a models.paint.Painting while paint-with-words samples
        self.to_k_extra = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_extra = nn.Linear(cross_dim, inner_dim, bias=False)
        nn.init.zeros_(self.to_v_extra.weight)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("ExtraTokensAttnProcessor is for plain cross-attention layers")
        text = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - self.n_extra]
        extra_tokens = encoder_hidden_states[:, text.shape[1] :]

        def extra(q: torch.Tensor, split: Any) -> torch.Tensor:  # the semantics and palette tokens
            dtype = q.dtype
            k2 = split(self.to_k_extra(extra_tokens.to(dtype)))
            return F.scaled_dot_product_attention(q, k2, split(self.to_v_extra(extra_tokens.to(dtype))))

        # the caption tokens as the base attends to them (painted while paint-with-words samples)
        return cross_attention(
            attn, hidden_states, text, self.painting, extra=extra if self.n_extra else None
        )


def build_unet(base_config: dict[str, Any], local_channels: int, n_extra: int) -> UNet2DConditionModel:
    """The base UNet's architecture with the zero-start paths above (weights: ``load_base``)."""
    check_base_unet(base_config)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "class_embed_type": "identity"})
    unet.conv_in = ZeroConvIn(unet.conv_in, local_channels)
    processors = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            processors[name] = ExtraTokensAttnProcessor(attn.cross_attention_dim, attn.inner_dim, n_extra)
        else:
            processors[name] = proc
    unet.set_attn_processor(processors)
    return unet


def base_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A base UNet's weights under the names they take in ``build_unet``'s UNet."""
    return {
        (k.replace("conv_in.", "conv_in.base.", 1) if k.startswith("conv_in.") else k): v
        for k, v in unet.state_dict().items()
    }


def is_new_parameter(name: str) -> bool:
    """Whether a ``ComposerModel`` parameter name is one this construction adds to the base UNet
    (trained in the adapter mode) rather than one of the base's own (frozen there)."""
    if not name.startswith("unet."):
        return True
    return ".processor." in name or name.startswith("unet.conv_in.local.") or "lora_" in name


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None) -> None:
    """peft LoRA (rank ``rank``) on the base's attention projections; B starts at zero, so the
    UNet's output is unchanged until trained."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            init_lora_weights="gaussian",
            target_modules=list(LORA_TARGETS),
        )
    )
