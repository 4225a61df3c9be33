"""Typed configs of the audio families: ``vocoder`` (Vocos-style) and ``audio_vae``.

Units used throughout: ``sample_rate`` in Hz; ``n_fft``, ``hop_length``, ``win_length`` and
``segment_samples`` in samples; mel frames are centred STFT frames, so a segment of ``S`` samples
has ``S // hop_length + 1`` frames.

Sources: Vocos (Siuzdak 2023, arXiv:2306.00814, github.com/gemelo-ai/vocos) for the vocoder;
HiFi-GAN (Kong et al. 2020) MPD, UnivNet (Jang et al. 2021) MRD and Parallel WaveGAN
(Yamamoto et al. 2020) multi-resolution STFT loss for the training objective.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Literal, Optional

from pydantic import Field, model_validator

from megaray.config import ModelConfig

# --------------------------------------------------------------------------- vocoder

_TINY = dict(
    sample_rate=16000,
    n_fft=512,
    hop_length=128,
    win_length=512,
    n_mels=80,
    segment_samples=8192,
    dim=64,
    intermediate_dim=192,
    num_layers=3,
    mrstft_resolutions=[[512, 128, 512], [256, 64, 256], [1024, 256, 1024]],
    mpd_periods=[2, 3, 5],
    mpd_channels=[8, 16, 32],
    mrd_resolutions=[[512, 128, 512], [256, 64, 256]],
    mrd_channels=16,
)

VOCODER_PRESETS: Dict[str, Dict[str, Any]] = {
    # Vocos "mel" model as published: 24 kHz, 100 mels, n_fft 1024, hop 256, ConvNeXt 512/1536 x 8.
    # 13.53M parameters (Vocos reports 13.5M).
    "base": dict(
        sample_rate=24000,
        n_fft=1024,
        hop_length=256,
        win_length=1024,
        n_mels=100,
        segment_samples=16384,
        dim=512,
        intermediate_dim=1536,
        num_layers=8,
        head="full",
    ),
    # Same recipe at 16 kHz / 80 mels, matching `megaray prepare audio` defaults.
    "base_16k": dict(
        sample_rate=16000,
        n_fft=1024,
        hop_length=256,
        win_length=1024,
        n_mels=80,
        segment_samples=16384,
        dim=512,
        intermediate_dim=1536,
        num_layers=8,
        head="full",
    ),
    # Tiny variants for tests, CPU demos and benchmarks.
    "tiny_lightheaded_freq_domain_vocoder": dict(_TINY, head="light", head_dim=32),
    "tiny_splitband_freq_domain_vocoder": dict(_TINY, head="splitband", head_dim=48, split_hz=4000.0),
}


class VocoderConfig(ModelConfig):
    """Frequency-domain (iSTFT) vocoder: log-mel ``(B, n_mels, F)`` -> waveform ``(B, (F-1)*hop)``.

    Heads (``head``):
        ``full``: one linear layer ``dim -> n_fft + 2`` (log-magnitude and phase per bin), as Vocos.
        ``light``: a ``dim -> head_dim -> n_fft + 2`` bottleneck (fewer head parameters).
        ``splitband``: separate heads (each ``dim -> head_dim -> 2*bins``) for bins below and
            above ``split_hz``.

    Raises (through validation, as ConfigError):
        win_length > n_fft, hop_length > win_length, segment_samples not a multiple of
        hop_length, split_hz outside (0, sample_rate/2), an adversarial run without periods
        or resolutions.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = VOCODER_PRESETS

    family: Literal["vocoder"] = "vocoder"
    # analysis (must match the shards written by `prepare_audio`)
    sample_rate: int = Field(16000, gt=0, description="Hz")
    n_fft: int = Field(1024, gt=0, description="STFT size in samples (analysis and synthesis)")
    hop_length: int = Field(256, gt=0, description="samples between frames")
    win_length: int = Field(1024, gt=0, description="Hann window length in samples")
    n_mels: int = Field(80, gt=0)
    f_min: float = Field(0.0, ge=0, description="Hz")
    f_max: Optional[float] = Field(None, gt=0, description="Hz; None = sample_rate / 2")
    segment_samples: int = Field(16384, gt=0, description="training crop length in samples")
    # backbone (ConvNeXt, 1-D)
    dim: int = Field(512, gt=0, description="backbone channels")
    intermediate_dim: int = Field(1536, gt=0, description="ConvNeXt pointwise hidden width")
    num_layers: int = Field(8, gt=0)
    kernel_size: int = Field(7, gt=0, description="depthwise conv kernel (odd)")
    layer_scale_init: Optional[float] = Field(None, gt=0, description="ConvNeXt gamma init; None = 1/num_layers")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)"
    )
    # head
    head: Literal["full", "light", "splitband"] = "full"
    head_dim: int = Field(128, gt=0, description="hidden width of the light / split-band heads")
    split_hz: float = Field(4000.0, gt=0, description="split-band boundary in Hz")
    mag_clip: float = Field(100.0, gt=0, description="upper clip of exp(log-magnitude), as Vocos (1e2)")
    # losses
    mel_weight: float = Field(45.0, ge=0, description="mel L1 weight (HiFi-GAN uses 45)")
    mrstft_weight: float = Field(1.0, ge=0, description="multi-resolution STFT loss weight")
    mrstft_resolutions: List[List[int]] = Field(
        default_factory=lambda: [[1024, 256, 1024], [2048, 512, 2048], [512, 128, 512]],
        description="[n_fft, hop, win] per resolution (Parallel WaveGAN)",
    )
    phase_weight: float = Field(
        0.0,
        ge=0,
        description="APNet anti-wrapping phase loss weight (instantaneous "
        "phase + group delay + instantaneous angular frequency, at the model's n_fft/hop/win; "
        "APNet uses 100); 0 = off",
    )
    # adversarial training
    adversarial: bool = Field(False, description="train MPD + MRD discriminators (second engine 'disc')")
    adv_start_step: int = Field(0, ge=0, description="adversarial + feature-matching losses start at this step")
    adv_weight: float = Field(1.0, ge=0)
    fm_weight: float = Field(2.0, ge=0, description="feature-matching loss weight (HiFi-GAN uses 2)")
    mpd_periods: List[int] = Field(default_factory=lambda: [2, 3, 5, 7, 11])
    mpd_channels: List[int] = Field(default_factory=lambda: [32, 128, 512, 1024], description="MPD conv widths")
    mrd_resolutions: List[List[int]] = Field(
        default_factory=lambda: [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]],
        description="[n_fft, hop, win] per MRD sub-discriminator (UnivNet)",
    )
    mrd_channels: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "VocoderConfig":
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.hop_length > self.win_length:
            raise ValueError(f"hop_length ({self.hop_length}) must not exceed win_length ({self.win_length})")
        if self.segment_samples % self.hop_length:
            raise ValueError(
                f"segment_samples ({self.segment_samples}) must be a multiple of hop_length ({self.hop_length})"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.head == "splitband" and not 0 < self.split_hz < self.sample_rate / 2:
            raise ValueError(f"split_hz ({self.split_hz}) must lie in (0, sample_rate/2 = {self.sample_rate / 2})")
        for r in list(self.mrstft_resolutions) + list(self.mrd_resolutions):
            if len(r) != 3 or r[2] > r[0]:
                raise ValueError(f"resolution {r} must be [n_fft, hop, win] with win <= n_fft")
        if self.adversarial and not (self.mpd_periods or self.mrd_resolutions):
            raise ValueError("adversarial training needs mpd_periods or mrd_resolutions")
        return self

    @property
    def n_bins(self) -> int:
        """STFT bins ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    @property
    def split_bin(self) -> int:
        """First bin of the high band in the split-band head."""
        return max(1, min(self.n_bins - 1, round(self.split_hz / (self.sample_rate / 2) * (self.n_bins - 1))))

    def stage_strides(self, axis: Literal["freq", "time"]) -> List[int]:
        """Per-stage strides along ``axis`` (stride-1 stages dropped): the configured list, or the
        factor's prime factors, largest first (``75 -> [5, 5, 3]``, ``8 -> [2, 2, 2]``, ``1 -> []``)."""
        given = self.freq_strides if axis == "freq" else self.time_strides
        if given is not None:
            return [s for s in given if s > 1]
        n, out, p = (self.down_freq if axis == "freq" else self.down_time), [], 2
        while n > 1:
            while n % p == 0:
                out.append(p)
                n //= p
            p += 1
        return sorted(out, reverse=True)

    @property
    def segment_frames(self) -> int:
        """Mel frames of one training segment: ``segment_samples // hop_length + 1``."""
        return self.segment_samples // self.hop_length + 1


# --------------------------------------------------------------------------- audio VAE

VAE_PRESETS: Dict[str, Dict[str, Any]] = {
    # 80-mel 16 kHz latent: 4x down in frequency, 4x in time, 8 latent channels.
    "small": dict(channels=[32, 64, 128], latent_channels=8, down_freq=4, down_time=4, speaker_dim=64),
    "small_wide": dict(channels=[64, 128, 256], latent_channels=16, down_freq=4, down_time=4, speaker_dim=128),
    # the reference geometry: 80 mels at 16 kHz, hop 160 (100 frames/s) -> latent [C, 10, T/75], one
    # latent frame per 0.75 s; time 75 = 5 x 5 x 3, frequency 8 = 2 x 2 x 2 (three stages); a training
    # crop of 750 frames (7.5 s). Real speaker embeddings: speaker_source="vector" (192-d, ECAPA-TDNN).
    "small_75x8": dict(
        channels=[32, 64, 128],
        latent_channels=16,
        down_freq=8,
        down_time=75,
        speaker_dim=64,
        hop_length=160,
        segment_samples=749 * 160,
    ),
    # tests
    "tiny": dict(
        channels=[8, 16],
        latent_channels=4,
        down_freq=4,
        down_time=2,
        speaker_dim=16,
        n_fft=512,
        hop_length=128,
        segment_samples=8192,
    ),
}


class AudioVAEConfig(ModelConfig):
    """Log-mel VAE ``(B, 1, n_mels, T) -> latent (B, latent_channels, n_mels/down_freq, T/down_time)``.

    The decoder is conditioned on a speaker embedding through FiLM; the encoder never sees the
    speaker. ``speaker_source`` picks a learned table over ``speaker_id`` (``table``) or a linear
    projection of a precomputed ``speaker_vector`` column of ``speaker_vector_dim`` (192 like
    ECAPA-TDNN; ``vector``).

    Down factors are any positive integers: each is split into per-stage strides (``time_strides``,
    ``freq_strides``; by default its prime factors, largest first, one per stage, so 75 -> 5, 5, 3 and
    8 -> 2, 2, 2), and the stages' strides multiply out to the factor.

    Raises (through validation, as ConfigError): strides that do not multiply out to their factor,
    more downsampling stages than ``channels``, n_mels not divisible by down_freq.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = VAE_PRESETS

    family: Literal["audio_vae"] = "audio_vae"
    sample_rate: int = Field(16000, gt=0, description="Hz (must match the shards)")
    n_fft: int = Field(1024, gt=0)
    hop_length: int = Field(256, gt=0, description="samples")
    n_mels: int = Field(80, gt=0)
    segment_samples: int = Field(16384, gt=0, description="training crop length in samples")
    channels: List[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    latent_channels: int = Field(8, gt=0)
    down_freq: int = Field(4, gt=0, description="mel-axis downsampling factor (any integer; see freq_strides)")
    down_time: int = Field(4, gt=0, description="frame-axis downsampling factor (any integer; see time_strides)")
    freq_strides: Optional[List[int]] = Field(
        None,
        description="per-stage mel-axis strides multiplying out to down_freq; None = its prime factors, largest first",
    )
    time_strides: Optional[List[int]] = Field(
        None,
        description="per-stage frame-axis strides multiplying out to down_time (e.g. [5, 5, 3] for 75); "
        "None = its prime factors, largest first",
    )
    speaker_source: Literal["table", "vector"] = "table"
    num_speakers: int = Field(64, gt=0, description="rows of the speaker table (ids beyond wrap modulo)")
    speaker_vector_dim: int = Field(192, gt=0)
    speaker_dim: int = Field(64, gt=0, description="FiLM conditioning width")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)"
    )
    kl_weight: float = Field(1e-4, ge=0)
    recon_loss: Literal["l1", "mse"] = "l1"

    @model_validator(mode="after")
    def _check(self) -> "AudioVAEConfig":
        for name, strides in (("freq_strides", self.freq_strides), ("time_strides", self.time_strides)):
            factor = getattr(self, "down_" + name.split("_")[0])
            if strides is not None and (any(s < 1 for s in strides) or math.prod(strides) != factor):
                raise ValueError(
                    f"{name} {strides} must be positive and multiply out to down_{name.split('_')[0]} ({factor})"
                )
        f, t = self.stage_strides("freq"), self.stage_strides("time")
        stages = max(len(f), len(t))
        if stages > len(self.channels):
            raise ValueError(
                f"{stages} downsampling stages (freq {f}, time {t}) need at least {stages} channels "
                f"entries, got {self.channels}"
            )
        if self.n_mels % self.down_freq:
            raise ValueError(f"n_mels ({self.n_mels}) must be divisible by down_freq ({self.down_freq})")
        if self.segment_samples % self.hop_length:
            raise ValueError(
                f"segment_samples ({self.segment_samples}) must be a multiple of hop_length ({self.hop_length})"
            )
        return self

    def stage_strides(self, axis: Literal["freq", "time"]) -> List[int]:
        """Per-stage strides along ``axis`` (stride-1 stages dropped): the configured list, or the
        factor's prime factors, largest first (``75 -> [5, 5, 3]``, ``8 -> [2, 2, 2]``, ``1 -> []``)."""
        given = self.freq_strides if axis == "freq" else self.time_strides
        if given is not None:
            return [s for s in given if s > 1]
        n, out, p = (self.down_freq if axis == "freq" else self.down_time), [], 2
        while n > 1:
            while n % p == 0:
                out.append(p)
                n //= p
            p += 1
        return sorted(out, reverse=True)

    @property
    def segment_frames(self) -> int:
        """Mel frames of one training segment: ``segment_samples // hop_length + 1``."""
        return self.segment_samples // self.hop_length + 1
