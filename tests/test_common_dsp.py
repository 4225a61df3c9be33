"""megaray.models.common.dsp against torch / torchaudio references. CPU only, no Ray."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from megaray.models.common import dsp


def voiced(n: int, sr: int, seed: int = 0) -> torch.Tensor:
    """Harmonics of a gliding f0 plus a little noise, peak 0.9: a speech-like test signal."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / sr
    phase = 2 * math.pi * torch.cumsum(150 + 40 * torch.sin(2 * math.pi * 2 * t), 0) / sr
    y = sum(torch.sin(k * phase) / k for k in range(1, 9)) + 0.02 * torch.randn(n, generator=g)
    return 0.9 * y / y.abs().max()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a - b).norm() / b.norm()).item()


def reference_griffin_lim(
    log_mel: torch.Tensor, sr: int, n_fft: int, hop: int, n_iter: int, momentum: float = 0.99
) -> torch.Tensor:
    """What :func:`dsp.griffin_lim` promises, written out with ``torch.stft`` / ``torch.istft``:
    minimum-norm least-squares mel inversion (gelsd), then fast Griffin-Lim (Perraudin et al.
    2013; torchaudio's parametrisation, the previous rebuilt spectrum weighted by
    ``momentum / (1 + momentum)``) from a zero phase, peak 0.9."""
    fb = dsp.mel_filterbank(sr, n_fft, log_mel.shape[-2])  # (bins, n_mels)
    mag = torch.linalg.lstsq(fb.T, torch.exp(log_mel), driver="gelsd").solution.clamp_min(0)
    window = torch.hann_window(n_fft)
    alpha = momentum / (1 + momentum)
    phase = torch.ones_like(mag, dtype=torch.complex64)
    prev = torch.zeros((), dtype=torch.complex64)
    for _ in range(n_iter):
        rebuilt = torch.stft(
            torch.istft(mag * phase, n_fft, hop, window=window), n_fft, hop, window=window, return_complex=True
        )
        phase = rebuilt - alpha * prev
        phase = phase / (phase.abs() + 1e-16)
        prev = rebuilt
    y = torch.istft(mag * phase, n_fft, hop, window=window)
    return y / y.abs().max() * 0.9


# Griffin-Lim outputs are compared by relative L2 error, not elementwise to float precision: 48
# iterations with momentum 0.99 amplify a one-ulp difference in an FFT ~1e5-fold. MKL's FFT
# takes another path for a batch row than for the same row alone, per processor and per
# MKL_CBWR setting, so two renderings of the same mel that should be "the same" differ by up
# to 0.0087 relative L2 (0.014 max abs) -- measured on an AVX-512 AMD EPYC over MKL_CBWR unset /
# COMPATIBLE / AVX2 / AVX512 x ATEN_CPU_CAPABILITY default / avx2 / avx512 x 1 and 2 threads,
# unbatched and as rows of batches of 2 and 3 (ATEN_CPU_CAPABILITY changes nothing; MKL_CBWR
# set to any value makes batch rows equal the unbatched call on that machine, but not across
# machines, so the project does not set it for this). A wrong momentum moves the result far
# more: 0.985 / 0.995 give 0.091 / 0.082, 0.98 0.14, 0.9 0.70, plain Griffin-Lim (0) 1.27.
GRIFFIN_LIM_REL_TOL = 0.03


@pytest.mark.parametrize("n_fft,hop,win", [(512, 128, 512), (1024, 256, 800), (256, 64, 200)])
def test_stft_equals_torchaudio_spectrogram(n_fft, hop, win):
    x = voiced(8000, 16000)[None]
    ref = torchaudio.transforms.Spectrogram(n_fft, win_length=win, hop_length=hop, power=None)(x)
    ours = dsp.stft(x, n_fft, hop, win)
    assert ours.shape == (1, n_fft // 2 + 1, 8000 // hop + 1) and ours.is_complex()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dsp.stft_magnitude(x, n_fft, hop, win), ref.abs(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n_fft,hop,win", [(512, 128, 512), (1024, 256, 1024), (512, 128, 384)])
def test_stft_istft_round_trip(n_fft, hop, win):
    x = torch.stack([voiced(16384, 16000, seed=s) for s in range(2)])  # (2, L), L a multiple of hop
    spec = dsp.stft(x, n_fft, hop, win)
    y = dsp.istft(spec, n_fft, hop, win)
    assert y.shape == x.shape
    assert (y - x).abs().max().item() < 1e-5
    # length= trims / pads the output to an exact sample count
    assert dsp.istft(spec, n_fft, hop, win, length=16000).shape == (2, 16000)


def test_mel_filterbank_equals_torchaudio_melscale():
    ref = torchaudio.transforms.MelScale(80, 16000, f_min=20.0, f_max=7600.0, n_stft=513, mel_scale="htk").fb
    torch.testing.assert_close(dsp.mel_filterbank(16000, 1024, 80, 20.0, 7600.0), ref)
    assert dsp.mel_filterbank(24000, 1024, 100).shape == (513, 100)


@pytest.mark.parametrize("n_fft,hop,win,n_mels,sr", [(1024, 256, None, 80, 16000), (512, 128, 400, 64, 22050)])
def test_log_mel_equals_torchaudio_melspectrogram(n_fft, hop, win, n_mels, sr):
    x = voiced(sr // 2, sr)[None]
    ref = torchaudio.transforms.MelSpectrogram(
        sr, n_fft=n_fft, win_length=win, hop_length=hop, n_mels=n_mels, power=1.0, mel_scale="htk", norm=None
    )(x)
    ours = dsp.MelFeatures(sr, n_fft, hop, n_mels, win)(x)
    assert ours.shape == (1, n_mels, x.shape[-1] // hop + 1)
    torch.testing.assert_close(ours, torch.log(ref.clamp_min(dsp.LOG_FLOOR)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dsp.log_mel(x[0], sr, n_fft, hop, n_mels, win), ours[0])
    # silence sits exactly at the floor
    assert torch.equal(
        dsp.MelFeatures(sr, n_fft, hop, n_mels, win)(torch.zeros(1, 2048)),
        torch.full((1, n_mels, 2048 // hop + 1), math.log(dsp.LOG_FLOOR)),
    )


def test_transforms_stay_float32_under_bf16_cast_and_autocast():
    x = voiced(4096, 16000)[None]
    mel = dsp.MelFeatures(16000, 512, 128, 80)
    ref = mel(x)
    cast = dsp.MelFeatures(16000, 512, 128, 80).to(torch.bfloat16)
    assert cast.fb.dtype == torch.float32
    torch.testing.assert_close(
        cast(x.to(torch.bfloat16)), dsp.MelFeatures(16000, 512, 128, 80)(x.to(torch.bfloat16).float())
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mel(x), ref)
        assert dsp.stft(x, 512, 128).dtype == torch.complex64
        assert dsp.istft(dsp.stft(x, 512, 128), 512, 128).dtype == torch.float32


def test_griffin_lim_recovers_the_mel_and_touches_no_random_state():
    sr, n_fft, hop = 16000, 512, 128
    x = voiced(8192, sr)[None]
    mel = dsp.MelFeatures(sr, n_fft, hop, 64)(x)[0]  # (64, F)
    rng = torch.get_rng_state()
    y = dsp.griffin_lim(mel, sr, n_fft, hop, n_iter=48)
    assert torch.equal(torch.get_rng_state(), rng)
    assert y.shape == ((mel.shape[-1] - 1) * hop,)
    assert abs(y.abs().max().item() - 0.9) < 1e-6
    assert torch.equal(y, dsp.griffin_lim(mel, sr, n_fft, hop, n_iter=48))  # deterministic
    # the rendering's log-mel is close to the input's (up to the peak gain), far closer than noise's
    gain = math.log(0.9 / x.abs().max().item())  # both peak-normalised; log-mel is shift-equivariant in gain
    rec = dsp.MelFeatures(sr, n_fft, hop, 64)(y[None])[0]
    noise = dsp.MelFeatures(sr, n_fft, hop, 64)(0.3 * torch.randn(1, y.numel()))[0]
    loud = mel > mel.max() - 6  # bands within ~50 dB of the peak
    err = (rec - mel - gain)[loud].abs().mean().item()
    err_noise = (noise - mel)[loud].abs().mean().item()
    assert err < 0.45 and err < err_noise / 3, (err, err_noise)  # one iteration gives ~0.7
    # it is fast Griffin-Lim with momentum 0.99, and batched input works the same (to the
    # hardware spread above: GRIFFIN_LIM_REL_TOL)
    ref = reference_griffin_lim(mel, sr, n_fft, hop, n_iter=48)
    assert rel_l2(y, ref) < GRIFFIN_LIM_REL_TOL
    batched = dsp.griffin_lim(mel[None].repeat(2, 1, 1), sr, n_fft, hop, n_iter=48)
    assert batched.shape == (2, *y.shape)
    assert max(rel_l2(row, y) for row in batched) < GRIFFIN_LIM_REL_TOL
