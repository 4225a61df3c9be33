"""Losses for audio generators.

* Multi-resolution STFT loss: spectral convergence + log-magnitude L1 averaged over resolutions,
  Parallel WaveGAN (Yamamoto et al. 2020, arXiv:1910.11480, eq. 1-4), reference
  github.com/kan-bayashi/ParallelWaveGAN ``stft_loss.py``.
* Mel L1 (HiFi-GAN's reconstruction loss, Kong et al. 2020).
* Least-squares GAN losses and feature matching (HiFi-GAN eq. 1-3, 5).
* Anti-wrapping phase loss: instantaneous phase, group delay and instantaneous angular frequency
  errors through the anti-wrapping function, APNet (Ai & Ling 2023, arXiv:2305.07952, eq. 5-9),
  reference github.com/YangAi520/APNet ``models.py`` (``anti_wrapping_function``, ``phase_loss``).

All take waveforms ``(B, L)`` (float32 internally) and return scalars.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.audio.discriminators import DiscOutput
from megaray.models.common.dsp import MelFeatures, stft, stft_magnitude


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


def anti_wrap(x: torch.Tensor) -> torch.Tensor:
    """APNet's anti-wrapping function ``|x - 2 pi round(x / 2 pi)|``: the distance of a phase
    difference (radians) to the nearest multiple of 2 pi, in ``[0, pi]``."""
    return torch.abs(x - 2 * torch.pi * torch.round(x / (2 * torch.pi)))


def phase_loss(
    y_hat: torch.Tensor, y: torch.Tensor, n_fft: int, hop_length: int, win_length: int, floor: float = 1e-5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """APNet phase loss between waveforms ``(B, L)``: ``(total, ip, gd, iaf)``, each a scalar in
    radians, ``total = ip + gd + iaf``.

    ``ip``: mean anti-wrapped difference of the STFT phases; ``gd`` (group delay): of their
    differences along frequency; ``iaf`` (instantaneous angular frequency): along time. A bin
    counts only where both magnitudes exceed ``floor`` (the phase of a silent bin is noise; its
    gradient through ``atan2`` would be unbounded); the differences count where both of their
    bins do. STFT: :func:`megaray.models.common.dsp.stft` at ``n_fft``/``hop_length``/``win_length``.
    """
    n = min(y_hat.shape[-1], y.shape[-1])
    s_hat, s = stft(y_hat[..., :n], n_fft, hop_length, win_length), stft(y[..., :n], n_fft, hop_length, win_length)
    keep = (s_hat.abs() > floor) & (s.abs() > floor)  # (B, bins, frames)
    one = torch.ones_like(s)
    p_hat = torch.angle(torch.where(keep, s_hat, one))  # masked bins: angle 0 with zero gradient
    p = torch.angle(torch.where(keep, s, one))

    def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / mask.sum().clamp_min(1)

    ip = masked_mean(anti_wrap(p_hat - p), keep)
    gd = masked_mean(anti_wrap(torch.diff(p_hat, dim=1) - torch.diff(p, dim=1)), keep[:, 1:] & keep[:, :-1])
    iaf = masked_mean(anti_wrap(torch.diff(p_hat, dim=2) - torch.diff(p, dim=2)), keep[..., 1:] & keep[..., :-1])
    return ip + gd + iaf, ip, gd, iaf


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
