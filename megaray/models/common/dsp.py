"""Audio signal processing shared by every audio model, loss, data pipeline and artifact.

One definition of each transform (all Hann-window, centred frames, reflect padding, float32):

* :func:`stft` / :func:`stft_magnitude`: waveform ``(B, L)`` -> complex / magnitude
  ``(B, n_fft // 2 + 1, L // hop_length + 1)`` (``torch.stft``);
* :func:`istft`: the inverse, ``(B, bins, F)`` -> ``(B, (F - 1) * hop_length)`` (``torch.istft``);
* :func:`mel_filterbank`: ``(bins, n_mels)`` HTK-scale triangles without area normalisation
  (``torchaudio.functional.melscale_fbanks``);
* :class:`MelFeatures` / :func:`log_mel`: the log-mel spectrogram, Vocos'
  ``MelSpectrogramFeatures`` (Siuzdak 2023): magnitude (``power=1``) mel of the STFT, then
  ``log(clamp(x, min=LOG_FLOOR))``. It equals ``torchaudio.transforms.MelSpectrogram(power=1,
  mel_scale="htk", norm=None)`` followed by the log (tested); it exists so that the STFT and the
  filterbank stay float32 when DeepSpeed casts the surrounding module to bf16;
* :func:`griffin_lim`: log-mel -> waveform through ``torchaudio``'s ``InverseMelScale``
  (minimum-norm least squares, so rank-deficient filterbanks work) and ``GriffinLim``
  (Griffin & Lim 1984, fast variant of Perraudin et al. 2013). A listening aid, not a vocoder.

Every function runs with autocast disabled, so bf16/fp16 training never reaches the FFT. Windows
are built once per ``(win_length, device)`` (:func:`hann_window`).
Units: ``sample_rate``, ``f_min``, ``f_max`` in Hz; ``n_fft``, ``hop_length``, ``win_length`` in
samples (``win_length`` defaults to ``n_fft``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

#: floor of the mel magnitude before the log; ``log(LOG_FLOOR)`` is the log-mel value of silence.
LOG_FLOOR = 1e-5


@functools.lru_cache(maxsize=64)
def hann_window(win_length: int, device: torch.device) -> torch.Tensor:
    """Periodic float32 Hann window of ``win_length`` samples on ``device``, built once per
    ``(win_length, device)`` and shared (read-only: :func:`stft` / :func:`istft` never write it).
    Built outside inference mode and autograd, so a window first made under
    ``torch.inference_mode()`` can still be used in a training step."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.hann_window(win_length, device=device, dtype=torch.float32)


def stft(wave: torch.Tensor, n_fft: int, hop_length: int, win_length: Optional[int] = None) -> torch.Tensor:
    """Complex STFT of ``(B, L)`` or ``(L,)`` float samples -> ``(B, n_fft // 2 + 1, L // hop_length + 1)``.

    Periodic Hann window of ``win_length`` (zero-padded to ``n_fft``), centred frames with
    reflect padding, computed in float32.
    """
    win_length = win_length or n_fft
    with torch.autocast(device_type=wave.device.type, enabled=False):
        window = hann_window(win_length, wave.device)
        return torch.stft(
            wave.float(),
            n_fft,
            hop_length,
            win_length,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )


def stft_magnitude(wave: torch.Tensor, n_fft: int, hop_length: int, win_length: Optional[int] = None) -> torch.Tensor:
    """Linear magnitude ``|stft(wave)|``: ``(B, L)`` -> ``(B, n_fft // 2 + 1, frames)`` float32."""
    return stft(wave, n_fft, hop_length, win_length).abs()


def istft(
    spec: torch.Tensor, n_fft: int, hop_length: int, win_length: Optional[int] = None, length: Optional[int] = None
) -> torch.Tensor:
    """Inverse of :func:`stft`: complex ``(B, n_fft // 2 + 1, F)`` -> ``(B, length or (F - 1) * hop_length)``.

    Same window and centring as :func:`stft` (overlap-add with window-envelope normalisation),
    so ``istft(stft(x))`` returns ``x`` up to float error when ``hop_length <= win_length / 2``
    (Hann satisfies the NOLA condition then).
    """
    win_length = win_length or n_fft
    with torch.autocast(device_type=spec.device.type, enabled=False):
        window = hann_window(win_length, spec.device)
        return torch.istft(spec, n_fft, hop_length, win_length, window=window, center=True, length=length)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: Optional[float] = None
) -> torch.Tensor:
    """HTK-scale triangular mel filterbank ``(n_fft // 2 + 1, n_mels)`` float32, no area norm.

    ``f_max`` defaults to ``sample_rate / 2``. Raises ``ValueError`` (from torchaudio) for
    ``f_min > f_max``.
    """
    import torchaudio.functional as AF

    f_max = f_max if f_max is not None else sample_rate / 2
    return AF.melscale_fbanks(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm=None, mel_scale="htk").float()


class MelFeatures(nn.Module):
    """Waveform ``(B, L)`` or ``(L,)`` -> log-mel ``(B, n_mels, L // hop_length + 1)`` (or ``(n_mels, F)``).

    ``log(clamp(mel_filterbank.T @ |stft(wave)|, min=LOG_FLOOR))``. The filterbank is a
    non-persistent float32 buffer that stays float32 through ``.to(bf16)`` / ``.half()``
    (DeepSpeed casts whole modules); the output is always float32.

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
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length or n_fft
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)  # (bins, n_mels)
        self._fb32 = fb
        self.register_buffer("fb", fb.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the filterbank float32 through .to(bf16) / .half()
        super()._apply(fn, recurse)
        if self.fb.dtype != torch.float32:
            self.fb = self._fb32.to(self.fb.device)
        return self

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = stft_magnitude(wave, self.n_fft, self.hop_length, self.win_length)  # (B, bins, F)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            mel = torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)  # (B, n_mels, F)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))


def log_mel(
    wave: torch.Tensor, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, win_length: Optional[int] = None
) -> torch.Tensor:
    """Functional :class:`MelFeatures` (builds the filterbank each call; use the module in loops)."""
    return MelFeatures(sample_rate, n_fft, hop_length, n_mels, win_length).to(wave.device)(wave)


def griffin_lim(
    log_mel_spec: torch.Tensor,
    sample_rate: int,
    n_fft: int,
    hop_length: int,
    win_length: Optional[int] = None,
    f_min: float = 0.0,
    f_max: Optional[float] = None,
    n_iter: int = 32,
    peak: Optional[float] = 0.9,
) -> torch.Tensor:
    """Log-mel ``(n_mels, F)`` or ``(B, n_mels, F)`` (as :class:`MelFeatures` makes it) -> waveform
    ``((F - 1) * hop_length,)`` or ``(B, ...)`` float32 on the CPU.

    ``exp`` undoes the log; ``torchaudio.transforms.InverseMelScale`` (driver ``gelsd``: the
    minimum-norm least-squares solution, like a pseudo-inverse) maps mel magnitudes back to
    linear bins; ``torchaudio.transforms.GriffinLim`` (momentum 0.99) estimates the phase from a
    zero-phase start, so the result is deterministic and touches no random state. The waveform
    is scaled to ``peak`` absolute amplitude (``None``: left as is).
    """
    import torchaudio

    mel = torch.exp(log_mel_spec.detach().float().cpu())
    n_mels = mel.shape[-2]
    inverse = torchaudio.transforms.InverseMelScale(
        n_fft // 2 + 1,
        n_mels,
        sample_rate,
        f_min,
        f_max if f_max is not None else sample_rate / 2,
        norm=None,
        mel_scale="htk",
        driver="gelsd",
    )
    gl = torchaudio.transforms.GriffinLim(
        n_fft, n_iter=n_iter, win_length=win_length or n_fft, hop_length=hop_length, power=1.0, rand_init=False
    )
    wave = gl(inverse(mel))
    if peak is None:
        return wave
    return wave / wave.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) * peak
