"""Speaker-conditioned log-mel VAE (KL-regularised autoencoder, Kingma & Welling 2014).

Shapes::

    mel (B, 1, n_mels, T) --AudioEncoder--> mu, logvar (B, latent_channels, n_mels/down_freq, T/down_time)
    z (B, latent_channels, n_mels/df, T/dt) + speaker embedding (B, speaker_dim)
        --AudioDecoder (FiLM at every block)--> mel (B, 1, n_mels, T)

The encoder never sees the speaker, so the latent is pushed to carry content while the decoder
supplies the voice (nothing forces full disentanglement: the latent may still leak speaker
traits; the guarantee is only that the speaker is not *encoded into* it). The speaker embedding is a learned table over ``speaker_id`` or a
linear projection of a precomputed vector (192-dim, like ECAPA-TDNN, Desplanques et al. 2020).
FiLM: Perez et al. 2018.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.audio.config import AudioVAEConfig
from megaray.models.common.checkpointing import run_block
from megaray.models.common.conv import Downsample2d, ResnetBlock2d, Upsample2d, group_norm
from megaray.models.common.dsp import LOG_FLOOR

#: GroupNorm settings of every norm in the audio VAE (groups = gcd(width, 8), PyTorch's default eps)
_GROUPS, _EPS = 8, 1e-5


def _norm(ch: int) -> nn.GroupNorm:
    return group_norm(ch, _GROUPS, _EPS)


def _block(cin: int, cout: int, cond_dim: int = 0) -> ResnetBlock2d:
    """A ResNet block; with ``cond_dim`` the speaker enters through FiLM after the second norm."""
    return ResnetBlock2d(cin, cout, emb_dim=cond_dim, emb_mode="film", emb_act=False, groups=_GROUPS, eps=_EPS)


def _stage_strides(cfg: AudioVAEConfig) -> List[Tuple[int, int]]:
    """Per-stage ``(freq, time)`` strides: stage i takes the i-th entry of each axis's strides
    (:meth:`AudioVAEConfig.stage_strides`; 1 once an axis has none left). ``down_freq=4,
    down_time=75`` over 3 stages: ``[(2, 5), (2, 5), (1, 3)]``."""
    f, t = cfg.stage_strides("freq"), cfg.stage_strides("time")
    return [(f[i] if i < len(f) else 1, t[i] if i < len(t) else 1) for i in range(len(cfg.channels))]


class AudioEncoder(nn.Module):
    """``(B, 1, n_mels, T) -> (mu, logvar)``, each ``(B, latent_channels, n_mels/df, T/dt)``. No speaker input."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        chans = cfg.channels
        self.conv_in = nn.Conv2d(1, chans[0], 3, padding=1)
        blocks, downs, cin = [], [], chans[0]
        for ch, (sf, st) in zip(chans, _stage_strides(cfg)):
            blocks.append(_block(cin, ch))
            downs.append(Downsample2d(ch, (sf, st), padding="symmetric") if sf * st > 1 else nn.Identity())
            cin = ch
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, mel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.conv_in(mel)
        ckpt = self.activation_checkpointing and self.training
        for block, down in zip(self.blocks, self.downs):
            x = down(run_block(block, x, enabled=ckpt))
        mu, logvar = self.conv_out(F.silu(self.norm_out(x))).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)


class AudioDecoder(nn.Module):
    """``z (B, latent_channels, n_mels/df, T/dt)`` + ``cond (B, speaker_dim)`` -> ``(B, 1, n_mels, T)``."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        chans = list(reversed(cfg.channels))
        strides = list(reversed(_stage_strides(cfg)))
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        blocks, ups, cin = [], [], chans[0]
        for ch, (sf, st) in zip(chans, strides):
            blocks.append(_block(cin, ch, cfg.speaker_dim))
            ups.append(Upsample2d(ch, (sf, st)) if sf * st > 1 else nn.Identity())
            cin = ch
        self.blocks, self.ups = nn.ModuleList(blocks), nn.ModuleList(ups)
        self.out_block = _block(cin, cin, cfg.speaker_dim)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 1, 3, padding=1)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        ckpt = self.activation_checkpointing and self.training
        for block, up in zip(self.blocks, self.ups):
            x = up(run_block(block, x, cond, enabled=ckpt))
        x = run_block(self.out_block, x, cond, enabled=ckpt)
        return self.conv_out(F.silu(self.norm_out(x)))


class SpeakerEmbedding(nn.Module):
    """``speaker_id (B,) int`` (table) or ``speaker_vector (B, speaker_vector_dim)`` -> ``(B, speaker_dim)``."""

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        self.source, self.num = cfg.speaker_source, cfg.num_speakers
        if cfg.speaker_source == "table":
            self.table = nn.Embedding(cfg.num_speakers, cfg.speaker_dim)
        else:
            self.proj = nn.Linear(cfg.speaker_vector_dim, cfg.speaker_dim)

    def forward(
        self, speaker_id: Optional[torch.Tensor] = None, speaker_vector: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.source == "table":
            if speaker_id is None:
                raise ValueError("speaker_source 'table' needs speaker_id (B,) int64")
            return self.table(speaker_id.long().remainder(self.num))
        if speaker_vector is None:
            raise ValueError("speaker_source 'vector' needs speaker_vector (B, speaker_vector_dim)")
        return self.proj(speaker_vector.to(self.proj.weight.dtype))


class AudioVAE(nn.Module):
    """Log-mel VAE with a speaker-conditioned (FiLM) decoder. See the module docstring for shapes.

    ``forward(mel, speaker_id=None, speaker_vector=None) -> (recon, mu, logvar)`` accepts
    ``(B, n_mels, T)`` or ``(B, 1, n_mels, T)`` log-mels and returns ``recon`` in the input's
    shape; ``T`` is padded (with the log floor) to a multiple of ``down_time`` and cropped back.
    ``cfg.activation_checkpointing`` recomputes each ResNet block in backward while training.
    """

    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoder(cfg)
        self.decoder = AudioDecoder(cfg)
        self.speaker = SpeakerEmbedding(cfg)

    def _prep(self, mel: torch.Tensor) -> Tuple[torch.Tensor, bool, int]:
        squeeze = mel.dim() == 3
        x = mel.unsqueeze(1) if squeeze else mel
        if x.shape[2] != self.cfg.n_mels:
            raise ValueError(f"expected {self.cfg.n_mels} mel bands, got input of shape {tuple(mel.shape)}")
        t = x.shape[-1]
        pad = (-t) % self.cfg.down_time
        if pad:
            x = F.pad(x, (0, pad), value=math.log(LOG_FLOOR))
        return x.to(self.encoder.conv_in.weight.dtype), squeeze, t

    def encode(self, mel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``(B, [1,] n_mels, T)`` -> ``(mu, logvar)`` ``(B, latent_channels, n_mels/df, ceil(T/dt))``."""
        x, _, _ = self._prep(mel)
        return self.encoder(x)

    def decode(
        self, z: torch.Tensor, speaker_id: Optional[torch.Tensor] = None, speaker_vector: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Latent ``(B, latent_channels, n_mels/df, T')`` -> log-mel ``(B, 1, n_mels, T' * dt)``."""
        return self.decoder(z, self.speaker(speaker_id, speaker_vector))

    def forward(
        self,
        mel: torch.Tensor,
        speaker_id: Optional[torch.Tensor] = None,
        speaker_vector: Optional[torch.Tensor] = None,
        sample: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, squeeze, t = self._prep(mel)
        mu, logvar = self.encoder(x)
        sample = self.training if sample is None else sample
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        recon = self.decode(z, speaker_id, speaker_vector)[..., :t]
        return (recon.squeeze(1) if squeeze else recon), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean per latent element of ``KL(N(mu, exp(logvar)) || N(0, 1))``."""
    return 0.5 * torch.mean(mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())


def build_audio_vae(cfg: AudioVAEConfig) -> AudioVAE:
    """Registry builder: ``cfg -> AudioVAE``."""
    return AudioVAE(cfg)
