"""PatchGAN discriminator and hinge losses of VQGAN / LDM autoencoder training.

:class:`NLayerDiscriminator` follows pix2pix (Isola et al. 2017, ``junyanz/pytorch-CycleGAN-and-pix2pix``
``networks.NLayerDiscriminator``) as taming-transformers uses it (Esser et al. 2021,
``taming/modules/discriminator/model.py``): 4x4 convs, LeakyReLU(0.2), BatchNorm after all but the
first and last convs, weights initialised N(0, 0.02) and BatchNorm gains N(1, 0.02). It scores
overlapping patches: ``(B, 3, H, W) -> logits (B, 1, h, w)``; at 256x256 with 3 layers ``h = w =
30`` (a 70x70 receptive field each).

Hinge losses (Lim & Ye 2017; taming ``hinge_d_loss``): ``D: mean(relu(1 - real)) / 2 +
mean(relu(1 + fake)) / 2``, ``G: -mean(fake)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.image.config import ImageVAEConfig


class NLayerDiscriminator(nn.Module):
    """``(B, in_channels, H, W) -> (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2)`` patch logits.

    Args:
        in_channels: image channels.
        channels: width of the first conv (``ndf``); doubles per layer up to ``8 * channels``.
        n_layers: stride-2 convs (the first included); ``H`` must be at least ``2 ** (n_layers + 2)``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """taming's ``weights_init``: convs N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``(mean relu(1 - real) + mean relu(1 + fake)) / 2`` (scalar, fp32)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss against a hinge discriminator: ``-mean(D(fake))`` (scalar, fp32)."""
    return -logits_fake.float().mean()


def build_discriminator(cfg: ImageVAEConfig) -> NLayerDiscriminator:
    """The PatchGAN of ``cfg`` (``disc_channels``, ``disc_layers``)."""
    return NLayerDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers)
