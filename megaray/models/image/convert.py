"""Build an :class:`~megaray.models.image.vae.ImageVAE` from a ``diffusers`` ``AutoencoderKL``.

Users with local Stable Diffusion VAE weights start from them::

    from diffusers import AutoencoderKL
    vae = from_diffusers(AutoencoderKL.from_pretrained("/local/sd-vae-ft-mse"))

The layouts are the same network (LDM's), so conversion renames parameters
(:func:`diffusers_key_to_megaray`) and loads them strictly.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

from megaray.models.image.config import ImageVAEConfig
from megaray.models.image.vae import ImageVAE

#: (diffusers pattern, megaray replacement), applied in order to every key
_RENAMES = (
    (r"^(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.stages.\2.blocks.\3."),
    (r"^(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(?:down|up)samplers\.0\.conv\.", r"\1.stages.\2.resample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn.proj_out."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", r".skip."),
)


def diffusers_key_to_megaray(key: str) -> str:
    """``encoder.down_blocks.1.resnets.0.conv_shortcut.weight`` -> ``encoder.stages.1.blocks.0.skip.weight``."""
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def config_from_diffusers(dcfg: Any, **overrides: Any) -> ImageVAEConfig:
    """The :class:`ImageVAEConfig` of a diffusers ``AutoencoderKL.config``.

    Raises:
        ValueError: a variant megaray does not implement (other block types or activation,
            in/out channels that differ, only one of the quant convs, a ``shift_factor``).
    """
    blocks = set(dcfg.down_block_types) | set(dcfg.up_block_types)
    if blocks != {"DownEncoderBlock2D", "UpDecoderBlock2D"} or dcfg.act_fn != "silu":
        raise ValueError(
            f"from_diffusers: only DownEncoderBlock2D/UpDecoderBlock2D with silu convert, got "
            f"{sorted(blocks)} and act_fn={dcfg.act_fn!r}"
        )
    if dcfg.in_channels != dcfg.out_channels:
        raise ValueError(
            f"from_diffusers: in_channels ({dcfg.in_channels}) must equal out_channels ({dcfg.out_channels})"
        )
    quant = bool(getattr(dcfg, "use_quant_conv", True))
    if quant != bool(getattr(dcfg, "use_post_quant_conv", True)):
        raise ValueError("from_diffusers: use_quant_conv and use_post_quant_conv must agree")
    if getattr(dcfg, "shift_factor", None):
        raise ValueError(f"from_diffusers: shift_factor={dcfg.shift_factor} (SD3 / Flux VAEs) is not supported")
    fields: Dict[str, Any] = dict(
        in_channels=dcfg.in_channels,
        channels=list(dcfg.block_out_channels),
        layers_per_block=dcfg.layers_per_block,
        latent_channels=dcfg.latent_channels,
        norm_groups=dcfg.norm_num_groups,
        use_quant_conv=quant,
        mid_attention=bool(getattr(dcfg, "mid_block_add_attention", True)),
        scaling_factor=dcfg.scaling_factor,
        resolution=int(dcfg.sample_size if isinstance(dcfg.sample_size, int) else dcfg.sample_size[0]),
    )
    fields.update(overrides)
    return ImageVAEConfig.from_name(None, **fields)


def from_diffusers(autoencoder_kl: Any, config: Optional[ImageVAEConfig] = None) -> ImageVAE:
    """An :class:`ImageVAE` with the weights of ``autoencoder_kl`` (a ``diffusers.AutoencoderKL``),
    in float32 on the CPU. ``config``: use this config (same shapes) instead of the converted one.

    Raises:
        ValueError: an unsupported variant (:func:`config_from_diffusers`), or keys that do not
            match (names the first few).
    """
    cfg = config or config_from_diffusers(autoencoder_kl.config)
    model = ImageVAE(cfg)
    state = {diffusers_key_to_megaray(k): v.detach().float().cpu() for k, v in autoencoder_kl.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"from_diffusers: weights do not match the megaray VAE: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.float()
