"""Image family ``image_vae``: the latent-diffusion KL autoencoder.

``from megaray.models.image import ImageVAE, ImageVAEConfig``;
``ImageVAE(ImageVAEConfig.from_name("kl_f8"))``; ``vae.encode(x)`` -> :class:`DiagonalGaussian`,
``vae.decode(z)``; ``from_diffusers(autoencoder_kl)`` converts a ``diffusers`` ``AutoencoderKL``.
The PatchGAN discriminator and hinge losses are in :mod:`megaray.models.image.discriminator`.

Importing this package registers the family and nothing heavier (PEP 562 lazy names).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="image_vae",
        config="megaray.models.image.config:ImageVAEConfig",
        build="megaray.models.image.vae:build_image_vae",
        task="megaray.tasks.image_vae:ImageVAETask",
    )
)

_LAZY = {
    "ImageVAEConfig": "megaray.models.image.config",
    "ImageVAE": "megaray.models.image.vae",
    "DiagonalGaussian": "megaray.models.image.vae",
    "NLayerDiscriminator": "megaray.models.image.discriminator",
    "from_diffusers": "megaray.models.image.convert",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
