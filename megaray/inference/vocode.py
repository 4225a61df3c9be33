"""``megaray vocode``: audio file -> log-mel -> a trained vocoder -> wav file (file I/O lives here,
not in :mod:`megaray.models.audio.vocoder`)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch

from megaray.errors import ConfigError, DataError
from megaray.models.audio.config import VocoderConfig


def load_wave(path: str, sample_rate: int, normalize: Optional[str] = "peak") -> torch.Tensor:
    """Read ``path`` (local, ``s3://``, ``gs://``) with soundfile -> mono float32 ``(L,)`` at
    ``sample_rate`` Hz (channel mean, then windowed-sinc resampling).

    ``normalize``: ``"peak"`` (to 0.95, as ``prepare_audio``'s default) or ``None``.

    Raises:
        DataError: the file is missing, cannot be read or decoded, or holds no samples (named).
    """
    from megaray import fs
    from megaray.data.audio import decode_audio, peak_normalize, resample_mono

    data = fs.read_bytes(path)  # DataError naming the file
    try:
        wave, sr = decode_audio(data, name=os.path.basename(path))
    except ValueError as e:  # RejectedClip: empty, truncated, not audio
        raise DataError(f"input audio {path}: {e}") from None
    wave = resample_mono(wave, sr, sample_rate)
    if normalize == "peak":
        wave = peak_normalize(wave)
    return wave


@torch.no_grad()
def vocode_file(
    model: Any, cfg: VocoderConfig, in_path: str, out_path: str, normalize: Optional[str] = "peak"
) -> Dict[str, float]:
    """Analysis -> log-mel -> vocoder -> ``soundfile.write`` (PCM_16 wav, or by extension).

    Args:
        model: a :class:`~megaray.models.audio.vocoder.Vocoder` (or a DeepSpeed engine wrapping one).
        cfg: its config (``sample_rate`` in Hz decides the output rate).
        in_path: any soundfile-readable file; resampled to ``cfg.sample_rate``, mixed to mono.
        out_path: destination; its folder is created.

    Returns:
        ``{"seconds": audio length, "compute_seconds": ..., "rtf": seconds / compute_seconds}``.

    Raises:
        DataError: ``in_path`` missing or not decodable audio (see :func:`load_wave`).
    """
    import soundfile as sf

    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    wave = load_wave(in_path, cfg.sample_rate, normalize).to(device)
    t0 = time.perf_counter()
    mel = net.features(wave[None])  # (1, n_mels, F)
    out, _ = net(mel)  # (1, (F - 1) * hop)
    audio = out[0].float().clamp(-1, 1).cpu().numpy()  # the copy waits for the device
    dt = time.perf_counter() - t0
    net.train(was_training)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sf.write(out_path, audio, cfg.sample_rate)
    seconds = len(audio) / cfg.sample_rate
    return {"seconds": seconds, "compute_seconds": dt, "rtf": seconds / max(dt, 1e-9)}


def vocode_checkpoint(checkpoint: str | os.PathLike, in_path: str, out_path: str) -> Dict[str, Any]:
    """``megaray vocode``: load a vocoder checkpoint and run :func:`vocode_file`.

    The input is checked first, so a missing wav is reported as such, not as a checkpoint problem.

    Returns:
        ``{"output": out_path, "seconds", "compute_seconds", "rtf"}``.

    Raises:
        DataError: ``in_path`` missing or not audio. CheckpointError: no complete checkpoint or
        corrupt weights. ConfigError: the checkpoint is not a vocoder.
    """
    from megaray.train.checkpoint import load_for_inference

    if "://" not in str(in_path) and not os.path.isfile(in_path):
        raise DataError(f"input audio not found: {in_path}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, ckpt = load_for_inference(checkpoint, device)
    if cfg.model.family != "vocoder":
        raise ConfigError(
            f"{ckpt}: a {cfg.model.family!r} checkpoint, not a vocoder (train one with "
            "`megaray train configs/vocoder_tiny.yaml`)"
        )
    return {"output": str(out_path), **vocode_file(model, cfg.model, str(in_path), str(out_path))}
