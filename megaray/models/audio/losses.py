"""Losses for audio generators.

* Multi-resolution STFT loss: spectral convergence + log-magnitude L1 averaged over resolutions,
  Parallel WaveGAN (Yamamoto et al. 2020, arXiv:1910.11480, eq. 1-4), reference
  github.com/kan-bayashi/ParallelWaveGAN ``stft_loss.py``.
* Mel L1 (HiFi-GAN's reconstruction loss, Kong et al. 2020).
* Least-squares GAN losses and feature matching (HiFi-GAN eq. 1-3, 5).

All take waveforms ``(B, L)`` (float32 internally) and return scalars.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.audio.discriminators import DiscOutput
from megaray.models.common.dsp import MelFeatures, stft_magnitude


def spectral_convergence(mag_hat: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """``||mag - mag_hat||_F / ||mag||_F`` over the batch (magnitudes ``(B, bins, frames)``)."""
    return torch.linalg.norm(mag - mag_hat) / torch.linalg.norm(mag).clamp_min(1e-7)


def log_magnitude_l1(mag_hat: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Mean ``|log mag - log mag_hat|`` with magnitudes floored at 1e-7."""
    return F.l1_loss(torch.log(mag_hat.clamp_min(1e-7)), torch.log(mag.clamp_min(1e-7)))


class MultiResolutionSTFTLoss(nn.Module):
    """Parallel WaveGAN multi-resolution STFT loss: ``(y_hat (B, L), y (B, L)) -> (total, sc, mag)``.

    ``total = mean_r(sc_r) + mean_r(mag_r)`` over resolutions ``[n_fft, hop, win]`` (samples).
    """

    def __init__(self, resolutions: Sequence[Sequence[int]]):
        super().__init__()
        self.resolutions = [tuple(int(v) for v in r) for r in resolutions]

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = min(y_hat.shape[-1], y.shape[-1])
        y_hat, y = y_hat[..., :n], y[..., :n]
        sc = y.new_zeros((), dtype=torch.float32)
        mag = y.new_zeros((), dtype=torch.float32)
        for n_fft, hop, win in self.resolutions:
            m_hat = stft_magnitude(y_hat, n_fft, hop, win)
            m = stft_magnitude(y, n_fft, hop, win)
            sc = sc + spectral_convergence(m_hat, m)
            mag = mag + log_magnitude_l1(m_hat, m)
        k = len(self.resolutions)
        return sc / k + mag / k, sc / k, mag / k


def mel_l1(features: MelFeatures, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between log-mels of ``y_hat`` and ``y`` ``(B, L)`` (trimmed to the shorter length)."""
    n = min(y_hat.shape[-1], y.shape[-1])
    return F.l1_loss(features(y_hat[..., :n]), features(y[..., :n]))


def discriminator_loss(real: DiscOutput, fake: DiscOutput) -> torch.Tensor:
    """LSGAN discriminator loss ``sum_k mean((1 - D_k(y))^2) + mean(D_k(y_hat)^2)``."""
    loss = 0.0
    for (dr, _), (dg, _) in zip(real, fake):
        loss = loss + torch.mean((1 - dr.float()) ** 2) + torch.mean(dg.float() ** 2)
    return loss


def generator_adv_loss(fake: DiscOutput) -> torch.Tensor:
    """LSGAN generator loss ``sum_k mean((1 - D_k(y_hat))^2)``."""
    loss = 0.0
    for dg, _ in fake:
        loss = loss + torch.mean((1 - dg.float()) ** 2)
    return loss


def feature_matching_loss(real: DiscOutput, fake: DiscOutput) -> torch.Tensor:
    """HiFi-GAN feature matching: ``sum_k mean_l L1(fmap_real, fmap_fake)`` (real maps detached)."""
    loss = 0.0
    for (_, fr), (_, fg) in zip(real, fake):
        loss = loss + sum(F.l1_loss(g.float(), r.detach().float()) for r, g in zip(fr, fg)) / len(fr)
    return loss
