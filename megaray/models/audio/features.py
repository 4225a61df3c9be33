"""Audio analysis shared by data preparation, training losses and inference.

One definition of the log-mel spectrogram is used everywhere (``prepare_audio`` writes it into
the shards, the vocoder consumes it, the losses compare it), as in Vocos'
``MelSpectrogramFeatures``: the magnitude (``power=1``) mel spectrogram of centred Hann-window
frames on the HTK mel scale without area normalisation (torchaudio's ``MelSpectrogram``
defaults), then ``log(clamp(x, min=1e-5))``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

#: floor of the mel magnitude before the log; ``log(LOG_FLOOR)`` is the value of silence.
LOG_FLOOR = 1e-5


class MelFeatures(nn.Module):
    """Waveform ``(B, L)`` or ``(L,)`` -> log-mel ``(B, n_mels, L // hop_length + 1)`` (or ``(n_mels, F)``).

    Equal to ``torchaudio.transforms.MelSpectrogram(power=1, center=True, pad_mode="reflect",
    mel_scale="htk", norm=None)`` followed by ``log(clamp(., min=1e-5))`` (tested), but computed
    from an explicit filterbank so that the STFT and filterbank always run in float32, even when
    the surrounding module was cast to bf16 by DeepSpeed.

    Args:
        sample_rate: Hz.
        n_fft: FFT size in samples.
        hop_length: samples between centred frames.
        n_mels: mel bands.
        win_length: Hann window length in samples (default ``n_fft``).
        f_min, f_max: band edges in Hz (``f_max`` default ``sample_rate / 2``).
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        win_length: Optional[int] = None,
        f_min: float = 0.0,
        f_max: Optional[float] = None,
    ):
        super().__init__()
        import torchaudio.functional as AF

        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length or n_fft
        fb = AF.melscale_fbanks(
            n_fft // 2 + 1, f_min, f_max if f_max is not None else sample_rate / 2, n_mels, sample_rate,
            norm=None, mel_scale="htk",
        )  # (bins, n_mels)
        self._fb32 = fb.float()
        self.register_buffer("fb", fb.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the filterbank float32 through .to(bf16) / .half() (DeepSpeed casts whole modules)
        super()._apply(fn, recurse)
        if self.fb.dtype != torch.float32:
            self.fb = self._fb32.to(self.fb.device)
        return self

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(), self.n_fft, self.hop_length, self.win_length, window=torch.hann_window(self.win_length, device=wave.device),
                center=True, pad_mode="reflect", return_complex=True,
            ).abs()  # (B, bins, F)
            mel = torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)  # (B, n_mels, F)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))


def log_mel(
    wave: torch.Tensor,
    sample_rate: int,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    win_length: Optional[int] = None,
) -> torch.Tensor:
    """Functional :class:`MelFeatures` (builds the filterbank each call; use the module in loops)."""
    return MelFeatures(sample_rate, n_fft, hop_length, n_mels, win_length).to(wave.device)(wave)


def stft_magnitude(wave: torch.Tensor, n_fft: int, hop_length: int, win_length: int) -> torch.Tensor:
    """``(B, L)`` -> linear STFT magnitude ``(B, n_fft // 2 + 1, frames)`` (Hann, centred, float32)."""
    window = torch.hann_window(win_length, device=wave.device)
    with torch.autocast(device_type=wave.device.type, enabled=False):
        spec = torch.stft(
            wave.float(), n_fft, hop_length, win_length, window=window, center=True, return_complex=True
        )
    return spec.abs()
