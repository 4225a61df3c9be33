"""Typed config of the ``image_vae`` family: the latent-diffusion KL autoencoder and its losses.

Shapes: image ``(B, in_channels, H, W)`` in ``[-1, 1]`` <-> latent
``(B, latent_channels, H / f, W / f)`` with ``f = downsample_factor = 2 ** (len(channels) - 1)``
(every stage but the last halves the resolution, as in LDM / diffusers).

Preset names (what the numbers mean):

* ``kl_f8``: Stable Diffusion's KL-f8 autoencoder (Rombach et al. 2022, arXiv:2112.10752;
  ``CompVis/latent-diffusion`` ``configs/autoencoder/autoencoder_kl_32x32x4.yaml``): ``f = 8``,
  4 latent channels, widths 128-256-512-512, 2 ResNet blocks per stage, 83,653,863 parameters.
* ``small_4_2`` / ``gan_4_2`` (the MegaTransformer seeds' names): ``<size>_<f>_<latent channels>``,
  i.e. downsampling factor 4 (256x256 -> 64x64) and 2 latent channels. ``gan_4_2`` is the same
  shape trained with the PatchGAN discriminator and a wider first stage.
* ``tiny``: ``f = 2``, 4 latent channels, width 8, for tests (about 15k parameters).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional

from pydantic import Field, model_validator

from megaray.config import ModelConfig

IMAGE_VAE_PRESETS: Dict[str, Dict[str, Any]] = {
    "kl_f8": dict(
        channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        resolution=256,
        kl_weight=1e-6,
        adversarial=True,
        adv_start_step=50001,
        adv_weight=0.5,
    ),
    "small_4_2": dict(channels=[64, 128, 256], layers_per_block=2, latent_channels=2, resolution=256),
    "gan_4_2": dict(
        channels=[128, 256, 256],
        layers_per_block=2,
        latent_channels=2,
        resolution=256,
        adversarial=True,
        adv_start_step=10000,
        adv_weight=0.5,
    ),
    "tiny": dict(
        channels=[8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_groups=4,
        resolution=32,
        disc_layers=2,
        disc_channels=8,
    ),
}


class ImageVAEConfig(ModelConfig):
    """KL-regularised image autoencoder (LDM ``AutoencoderKL``) plus its training objective.

    Loss per image batch (:class:`megaray.tasks.image_vae.ImageVAETask`)::

        l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + perceptual_weight * LPIPS-VGG(x, x')
          + kl_weight * KL_sum / (3 H W)
          [+ adaptive adv_weight * hinge G loss, from optimizer step adv_start_step]

    ``KL_sum`` is the KL of one image's posterior summed over its latent elements (as LDM, whose
    reconstruction term is a per-image sum: dividing both by the pixel count keeps LDM's
    ``kl_weight`` meaning, 1e-6 for KL-f8).

    Raises (through validation, as ConfigError): norm_groups not dividing a width, a perceptual
    weight without ``lpips_vgg_path``.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = IMAGE_VAE_PRESETS

    family: Literal["image_vae"] = "image_vae"
    # network (diffusers AutoencoderKL names in brackets)
    in_channels: int = Field(3, gt=0, description="image channels (RGB)")
    channels: List[int] = Field(
        default_factory=lambda: [64, 128, 256], min_length=1, description="width of each stage [block_out_channels]"
    )
    layers_per_block: int = Field(2, gt=0, description="ResNet blocks per encoder stage (decoder: +1)")
    latent_channels: int = Field(2, gt=0)
    norm_groups: int = Field(32, gt=0, description="GroupNorm groups [norm_num_groups]")
    norm_eps: float = Field(1e-6, gt=0, description="GroupNorm epsilon (LDM: 1e-6)")
    mid_attention: bool = Field(True, description="self-attention between the two middle ResNet blocks")
    use_quant_conv: bool = Field(True, description="1x1 convs around the latent (LDM quant_conv / post_quant_conv)")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)"
    )
    scaling_factor: float = Field(
        0.18215, gt=0, description="latents given to a diffusion model are scaling_factor * z (SD)"
    )
    resolution: int = Field(256, gt=0, description="training image size in pixels (square crops)")
    # reconstruction and KL
    l1_weight: float = Field(1.0, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    kl_weight: float = Field(1e-6, ge=0, description="weight of the per-image KL sum over 3*H*W (LDM's kl_weight)")
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS-style VGG16 feature distance; needs lpips_vgg_path")
    lpips_vgg_path: Optional[str] = Field(
        None, description="local torchvision VGG16 state_dict (.pth); nothing is downloaded"
    )
    # adversarial (PatchGAN, hinge loss, adaptive weight)
    adversarial: bool = Field(False, description="train a PatchGAN discriminator (second engine 'disc')")
    adv_start_step: int = Field(
        0, ge=0, description="discriminator and generator GAN loss start at this optimizer step"
    )
    adv_weight: float = Field(0.5, ge=0, description="outer factor of the adaptive GAN weight (LDM disc_weight)")
    disc_layers: int = Field(3, gt=0, description="stride-2 conv layers of the PatchGAN (pix2pix n_layers)")
    disc_channels: int = Field(64, gt=0, description="width of the first PatchGAN layer (ndf)")

    @model_validator(mode="after")
    def _check(self) -> "ImageVAEConfig":
        for ch in self.channels:
            if ch % self.norm_groups:
                raise ValueError(f"channels: width {ch} is not divisible by norm_groups ({self.norm_groups})")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution ({self.resolution}) must be divisible by the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channels) - 1))"
            )
        if self.perceptual_weight > 0 and not self.lpips_vgg_path:
            raise ValueError(
                "perceptual_weight > 0 needs lpips_vgg_path (a local VGG16 state_dict; nothing is downloaded)"
            )
        if self.resolution < 2 ** (self.disc_layers + 2) and self.adversarial:
            raise ValueError(
                f"disc_layers ({self.disc_layers}) is too deep for resolution {self.resolution}; "
                f"use at most {max(1, self.resolution.bit_length() - 3)}"
            )
        return self

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling factor ``f = 2 ** (len(channels) - 1)`` of the encoder."""
        return 2 ** (len(self.channels) - 1)
