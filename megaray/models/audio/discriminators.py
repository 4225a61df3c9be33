"""GAN discriminators for vocoder training.

* Multi-period discriminator (MPD): HiFi-GAN, Kong et al. 2020 (arXiv:2010.05646), reference
  github.com/jik876/hifi-gan ``models.py`` ``DiscriminatorP``.
* Multi-resolution (spectrogram) discriminator (MRD): UnivNet, Jang et al. 2021
  (arXiv:2106.07889), as re-implemented in Vocos ``vocos/discriminators.py``.

Every sub-discriminator maps a waveform ``(B, L)`` to ``(logits (B, N), [feature maps])``; the
feature maps feed the feature-matching loss. Widths are config fields so tests and CPU demos can
use tiny discriminators.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from megaray.models.audio.config import VocoderConfig
from megaray.models.common.dsp import stft_magnitude

LRELU_SLOPE = 0.1
#: one ``(logits (B, N_k), [feature maps])`` per sub-discriminator ``k``
DiscOutput = List[Tuple[torch.Tensor, List[torch.Tensor]]]


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN ``DiscriminatorP``: ``(B, L)`` reshaped to ``(B, 1, L/p, p)``, 2-D convs over time.

    Kernels ``(5, 1)`` with stride 3 along time, one stride-1 conv, then a ``(3, 1)`` projection
    to one channel.
    """

    def __init__(self, period: int, channels: Sequence[int]):
        super().__init__()
        self.period = period
        chans = [1, *channels]
        convs = [nn.Conv2d(cin, cout, (5, 1), (3, 1), padding=(2, 0)) for cin, cout in zip(chans[:-1], chans[1:])]
        convs.append(nn.Conv2d(chans[-1], chans[-1], (5, 1), 1, padding=(2, 0)))
        self.convs = nn.ModuleList(weight_norm(c) for c in convs)
        self.post = weight_norm(nn.Conv2d(chans[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = y.unsqueeze(1)  # (B, 1, L)
        b, c, t = x.shape
        if t % self.period:
            pad = self.period - t % self.period
            x = F.pad(x, (0, pad), mode="reflect" if pad < t else "constant")
            t += pad
        x = x.view(b, c, t // self.period, self.period)  # (B, 1, L/p, p)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmaps.append(x)
        x = self.post(x)
        fmaps.append(x)
        return x.flatten(1), fmaps


class ResolutionDiscriminator(nn.Module):
    """UnivNet ``DiscriminatorR``: linear STFT magnitude ``(B, 1, frames, bins)`` -> 2-D convs.

    Kernels ``(3, 9)`` with stride 2 along frequency, then ``(3, 3)`` convs to one channel.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int, channels: int):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        convs = [
            nn.Conv2d(1, channels, (3, 9), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)),
        ]
        self.convs = nn.ModuleList(weight_norm(c) for c in convs)
        self.post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        spec = stft_magnitude(y, self.n_fft, self.hop_length, self.win_length)  # (B, bins, frames)
        x = spec.transpose(1, 2).unsqueeze(1).to(self.post.bias.dtype)  # (B, 1, frames, bins)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmaps.append(x)
        x = self.post(x)
        fmaps.append(x)
        return x.flatten(1), fmaps


class AudioDiscriminator(nn.Module):
    """MPD + MRD: waveform ``(B, L)`` -> one ``(logits (B, N_k), [fmaps])`` per sub-discriminator."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.discs = nn.ModuleList(
            [PeriodDiscriminator(p, cfg.mpd_channels) for p in cfg.mpd_periods]
            + [ResolutionDiscriminator(n, h, w, cfg.mrd_channels) for n, h, w in cfg.mrd_resolutions]
        )

    def forward(self, y: torch.Tensor) -> DiscOutput:
        dtype = next(self.parameters()).dtype
        y = y.to(dtype) if y.dtype != dtype else y
        return [d(y) for d in self.discs]
