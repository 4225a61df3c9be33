"""Per-clip audio processing: decode (soundfile) -> mono -> resample -> normalise -> log-mel.

Every check that turns a file into a reject raises :class:`RejectedClip` with a reason ``code``
(counted under that name in the manifest) and a human detail (``str(e)``).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import torch

#: = megaray.models.common.dsp.LOG_FLOOR, repeated so crop workers need not import torch
MEL_LOG_FLOOR = 1e-5


class RejectedClip(ValueError):
    """A source file that cannot become a training clip: ``code`` names the reason
    (``empty_file``, ``truncated``, ``unreadable``, ``zero_length``, ``non_finite``,
    ``wrong_rate``, ``too_short``, ``too_long``, ``silent``); ``str(e)`` gives the detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code

    def __reduce__(self):
        return RejectedClip, (self.code, str(self))


def _wav_truncation(data: bytes) -> Optional[str]:
    """Reason string when a RIFF/WAVE ``data`` chunk declares more bytes than the file holds."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    order = "little" if data[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], order)
        if cid == b"data":
            avail = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and avail < size:  # 0 / -1: streamed header, length unknown
                return f"truncated: data chunk declares {size} bytes, file holds {avail}"
            return None
        pos += 8 + size + (size & 1)
    return None


def decode_audio(data: bytes, name: str = "<bytes>") -> Tuple[np.ndarray, int]:
    """Decode wav/flac/ogg bytes with soundfile -> ``(float32 (L, C), sample_rate Hz)``.

    Raises:
        RejectedClip: empty file, undecodable (corrupt, not audio), truncated WAV, zero frames.
    """
    import soundfile as sf

    if not data:
        raise RejectedClip("empty_file", "empty file (0 bytes)")
    trunc = _wav_truncation(data)
    if trunc:
        raise RejectedClip("truncated", trunc)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, declared = f.samplerate, f.frames
            wave = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile: "Format not recognised", decode errors
        msg = re.sub(r"^Error opening <[^>]*>:\s*", "", str(e)).strip()
        raise RejectedClip("unreadable", f"unreadable: {msg[:160]}") from None
    if wave.shape[0] == 0:
        raise RejectedClip("zero_length", "zero-length audio (0 frames)")
    if 0 < declared and wave.shape[0] < declared:
        raise RejectedClip("truncated", f"truncated: decoded {wave.shape[0]} of {declared} frames")
    if not np.isfinite(wave).all():
        raise RejectedClip("non_finite", "non-finite samples")
    return wave, sr


def resample_mono(wave: Union[np.ndarray, "torch.Tensor"], sr: int, target_sr: int) -> "torch.Tensor":
    """``(L,)`` or ``(L, C)`` at ``sr`` Hz -> mono float32 ``(L',)`` at ``target_sr`` Hz
    (channel mean, then ``torchaudio.functional.resample``, windowed-sinc)."""
    import torch
    import torchaudio.functional as AF

    x = torch.as_tensor(wave, dtype=torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=1)
    if sr != target_sr:
        x = AF.resample(x, sr, target_sr)
    return x.contiguous()


def peak_normalize(wave: "torch.Tensor", peak: float = 0.95) -> "torch.Tensor":
    """Scale so ``max|x| == peak``; silent input is returned unchanged."""
    m = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (peak / m) if m > 0 else wave


def loudness_normalize(
    wave: "torch.Tensor", sample_rate: int, target_lufs: float = -23.0, max_peak: float = 0.99
) -> "torch.Tensor":
    """Gain to ``target_lufs`` integrated loudness (ITU-R BS.1770-4 via
    ``torchaudio.functional.loudness``); clips under 0.4 s (one gating block) use RMS dBFS instead.
    The gain is limited so the peak stays under ``max_peak`` (no clipping)."""
    import torch
    import torchaudio.functional as AF

    level = float("nan")
    if wave.numel() >= int(0.4 * sample_rate):
        try:
            level = float(AF.loudness(wave[None], sample_rate))
        except Exception:  # pragma: no cover - torchaudio edge cases
            level = float("nan")
    if not math.isfinite(level):
        rms = float(torch.sqrt(torch.mean(wave.double() ** 2)))
        level = 20 * math.log10(max(rms, 1e-12))
    gain = 10 ** ((target_lufs - level) / 20)
    peak = float(wave.abs().max())
    if peak * gain > max_peak:
        gain = max_peak / peak
    return wave * gain


@dataclass
class AudioPrepSettings:
    """What :func:`prepare_audio` does to each clip (also the manifest's record of it).

    Attributes:
        sample_rate: output rate in Hz (inputs are resampled unless ``input_sample_rate`` is set).
        n_mels, n_fft, hop_length, win_length: log-mel analysis (samples; win default n_fft).
        normalize: ``"peak"`` (to ``peak``) or ``"loudness"`` (to ``target_lufs``) or ``"none"``.
        input_sample_rate: if set, files at any other rate are rejected instead of resampled.
        min_seconds, max_seconds: duration bounds after resampling (``max_seconds`` None = none).
        silence_db: clips whose RMS (before normalisation) is below this dBFS are rejected.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 256
    win_length: Optional[int] = None
    normalize: str = "peak"
    peak: float = 0.95
    target_lufs: float = -23.0
    input_sample_rate: Optional[int] = None
    min_seconds: float = 0.1
    max_seconds: Optional[float] = None
    silence_db: float = -60.0


def process_clip(data: bytes, settings: AudioPrepSettings, features: Any, name: str = "<bytes>") -> Dict[str, Any]:
    """Decode -> mono -> resample -> normalise -> log-mel for one file's bytes.

    ``features`` is :func:`mel_features` of the settings (a :class:`megaray.models.common.dsp.MelFeatures`).
    Returns ``{"waveform": float32 (L,), "mel": float32 (n_mels, L // hop + 1), "duration": s}``.

    Raises:
        RejectedClip: see :func:`decode_audio`, plus wrong input rate, too short/long, silent.
    """
    import torch

    wave, sr = decode_audio(data, name)
    if settings.input_sample_rate and sr != settings.input_sample_rate:
        raise RejectedClip("wrong_rate", f"sample rate {sr} Hz, required {settings.input_sample_rate} Hz")
    x = resample_mono(wave, sr, settings.sample_rate)
    duration = x.numel() / settings.sample_rate
    if duration < settings.min_seconds:
        raise RejectedClip("too_short", f"too short: {duration:.3f} s < {settings.min_seconds} s")
    if settings.max_seconds is not None and duration > settings.max_seconds:
        raise RejectedClip("too_long", f"too long: {duration:.1f} s > {settings.max_seconds} s")
    rms = float(torch.sqrt(torch.mean(x.double() ** 2)))
    if rms <= 0 or 20 * math.log10(rms) < settings.silence_db:
        level = "-inf" if rms <= 0 else f"{20 * math.log10(rms):.1f}"
        raise RejectedClip("silent", f"silent: RMS {level} dBFS < {settings.silence_db} dBFS")
    if settings.normalize == "peak":
        x = peak_normalize(x, settings.peak)
    elif settings.normalize == "loudness":
        x = loudness_normalize(x, settings.sample_rate, settings.target_lufs)
    with torch.no_grad():
        mel = features(x[None])[0]
    return {"waveform": x.numpy().astype(np.float32), "mel": mel.numpy().astype(np.float32), "duration": duration}


def mel_features(settings: AudioPrepSettings):
    from megaray.models.common.dsp import MelFeatures

    return MelFeatures(settings.sample_rate, settings.n_fft, settings.hop_length, settings.n_mels, settings.win_length)
