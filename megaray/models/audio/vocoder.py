"""Frequency-domain (iSTFT) vocoder after Vocos (Siuzdak 2023, arXiv:2306.00814).

Reference implementation: github.com/gemelo-ai/vocos (``vocos/models.py``, ``vocos/heads.py``).
The network never upsamples in time: every mel frame is one STFT frame, and the waveform comes
out of ``torch.istft``::

    log-mel (B, n_mels, F) --VocosBackbone--> (B, F, dim) --head--> log|S|, angle(S) (B, bins, F)
        --> S = clip(exp(log|S|)) * (cos + i sin) --torch.istft--> waveform (B, (F - 1) * hop)

Swapping the head is a config change (``head: full | light | splitband``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from megaray.models.audio.config import VocoderConfig
from megaray.models.common.checkpointing import run_block
from megaray.models.common.dsp import MelFeatures, istft


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv1d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- backbone


class ConvNeXtBlock(nn.Module):
    """1-D ConvNeXt block (Liu et al. 2022, as in Vocos): ``(B, C, F) -> (B, C, F)``.

    depthwise conv (kernel k) -> LayerNorm -> Linear(C, H) -> GELU -> Linear(H, C) -> gamma -> + x.
    """

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # (B, F, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)  # (B, C, F)


class VocosBackbone(nn.Module):
    """Mel features ``(B, n_mels, F)`` -> hidden ``(B, F, dim)``: embed conv, ConvNeXt stack, norm
    (each block recomputed in backward when ``cfg.activation_checkpointing`` and training)."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.embed = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        scale = cfg.layer_scale_init or 1.0 / cfg.num_layers
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(cfg.dim, cfg.intermediate_dim, cfg.kernel_size, scale) for _ in range(cfg.num_layers)
        )
        self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.embed(mel)  # (B, C, F)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = run_block(block, x, enabled=self.activation_checkpointing and self.training)
        return self.final_norm(x.transpose(1, 2))  # (B, F, C)


# --------------------------------------------------------------------------- heads


class ISTFTHead(nn.Module):
    """Base of the iSTFT heads: hidden ``(B, F, dim)`` -> ``(waveform (B, (F-1)*hop), S (B, bins, F))``.

    Subclasses implement :meth:`predict` returning log-magnitude and phase angle ``(B, bins, F)``;
    :meth:`synthesize` turns them into the complex STFT and the waveform (Hann window,
    centred frames, float32 whatever the surrounding precision).
    """

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = cfg.n_fft, cfg.hop_length, cfg.win_length
        self.n_bins, self.mag_clip = cfg.n_bins, cfg.mag_clip

    def predict(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, F, dim)`` -> ``(log_mag, phase)``, each ``(B, bins, F)``."""
        raise NotImplementedError

    def synthesize(self, log_mag: torch.Tensor, phase: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, bins, F)`` log-magnitude and angle -> ``(waveform (B, (F-1)*hop), S complex (B, bins, F))``.

        The magnitude is ``exp(log_mag)`` clipped at ``mag_clip`` (Vocos: 1e2) so early training
        cannot overflow; the phase enters only through ``cos`` and ``sin``, so it is periodic.
        """
        with torch.autocast(device_type=log_mag.device.type, enabled=False):
            mag = torch.clip(torch.exp(log_mag.float()), max=self.mag_clip)
            phase = phase.float()
            spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        wave = istft(spec, self.n_fft, self.hop_length, self.win_length)
        return wave, spec

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.synthesize(*self.predict(x))


class FullHead(ISTFTHead):
    """Vocos head: one ``Linear(dim, n_fft + 2)``, split into log-magnitude and phase."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__(cfg)
        self.out = nn.Linear(cfg.dim, cfg.n_fft + 2)

    def predict(self, x):
        mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        return mag, phase


class LightHead(ISTFTHead):
    """Light head: ``Linear(dim, head_dim) -> GELU -> Linear(head_dim, n_fft + 2)``."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__(cfg)
        self.out = nn.Sequential(nn.Linear(cfg.dim, cfg.head_dim), nn.GELU(), nn.Linear(cfg.head_dim, cfg.n_fft + 2))

    def predict(self, x):
        mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        return mag, phase


class SplitBandHead(ISTFTHead):
    """Separate light heads for bins ``[0, split_bin)`` and ``[split_bin, bins)``, concatenated."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__(cfg)
        self.split = cfg.split_bin
        sizes = (self.split, cfg.n_bins - self.split)
        self.bands = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.dim, cfg.head_dim), nn.GELU(), nn.Linear(cfg.head_dim, 2 * n)) for n in sizes
        )

    def predict(self, x):
        parts = [band(x).transpose(1, 2).chunk(2, dim=1) for band in self.bands]  # [(mag, phase)] per band
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


HEADS = {"full": FullHead, "light": LightHead, "splitband": SplitBandHead}


# --------------------------------------------------------------------------- model


class Vocoder(nn.Module):
    """Vocos-style vocoder: log-mel ``(B, n_mels, F)`` -> ``(waveform (B, (F-1)*hop_length), S (B, bins, F))``.

    ``features`` (a :class:`MelFeatures` of the same analysis settings) turns a waveform into the
    model's input; it holds no trainable parameters.
    """

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.features = MelFeatures(
            cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.win_length, cfg.f_min, cfg.f_max
        )
        self.backbone = VocosBackbone(cfg)
        self.head = HEADS[cfg.head](cfg)
        self.apply(_init_weights)

    def forward(self, mel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = self.backbone.embed.weight.dtype
        return self.head(self.backbone(mel.to(dtype)))

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_vocoder(cfg: VocoderConfig) -> Vocoder:
    """Registry builder: ``cfg -> Vocoder``."""
    return Vocoder(cfg)
