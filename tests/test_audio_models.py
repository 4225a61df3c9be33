"""Audio models: Vocos-style vocoder, iSTFT heads, losses, discriminators, GAN step, audio VAE.

CPU only, tiny presets; no Ray. The real-DeepSpeed GAN step runs in a subprocess (marked slow).
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
from helpers import StandInEngine

from megaray import families as registry
from megaray.config import ConfigError
from megaray.families import build_run_config
from megaray.inference.vocode import vocode_file
from megaray.models.audio.config import AudioVAEConfig, VocoderConfig
from megaray.models.audio.discriminators import AudioDiscriminator
from megaray.models.audio.losses import MultiResolutionSTFTLoss, mel_l1
from megaray.models.audio.vae import AudioVAE, kl_divergence
from megaray.models.audio.vocoder import HEADS, Vocoder
from megaray.models.common.dsp import MelFeatures

TINY = ["tiny_lightheaded_freq_domain_vocoder", "tiny_splitband_freq_domain_vocoder"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def harmonic_clip(n: int, sr: int, seed: int = 0) -> torch.Tensor:
    """A voiced-speech-like test signal: 11 harmonics of a vibrato f0, amplitude envelope, noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / sr
    f0 = 140 + 30 * torch.sin(2 * math.pi * 3 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    y = sum(torch.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 2 * t).abs())
    y = y + 0.02 * torch.randn(n, generator=g)
    return 0.9 * y / y.abs().max()


# --------------------------------------------------------------------------- configs


def test_registry_resolves_audio_families():
    assert registry.config_class("vocoder") is VocoderConfig
    assert registry.config_class("audio_vae") is AudioVAEConfig
    cfg = build_run_config({"model": {"family": "vocoder", "preset": TINY[0], "num_layers": 2}})
    model = registry.build_model(cfg.model)
    assert isinstance(model, Vocoder) and len(model.backbone.blocks) == 2
    assert registry.task_class("vocoder").__name__ == "VocoderTask"
    assert registry.task_class("audio_vae").__name__ == "AudioVAETask"
    vae = registry.build_model(AudioVAEConfig.from_name("tiny"))
    assert isinstance(vae, AudioVAE)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="segment_samples"):
        VocoderConfig.from_name("base", segment_samples=1000)
    with pytest.raises(ConfigError, match="unknown preset"):
        VocoderConfig.from_name("huge")
    with pytest.raises(ConfigError, match="down_freq"):
        AudioVAEConfig.from_name("small", down_freq=3)  # 80 mels do not divide by 3
    with pytest.raises(ConfigError, match=r"time_strides \[5, 5\] must .* multiply out to down_time \(75\)"):
        AudioVAEConfig.from_name("small_75x8", time_strides=[5, 5])
    with pytest.raises(ConfigError, match="3 downsampling stages"):
        AudioVAEConfig.from_name("small_75x8", channels=[8, 16])
    with pytest.raises(ConfigError, match="n_mels"):
        AudioVAEConfig.from_name("small", n_mels=90, down_freq=4)


def test_base_preset_is_vocos_sized():
    """Vocos (Siuzdak 2023): 13.5M parameters for dim 512 / 1536 / 8 layers / 100 mels / n_fft 1024."""
    cfg = VocoderConfig.from_name("base")
    assert (cfg.dim, cfg.intermediate_dim, cfg.num_layers, cfg.n_mels, cfg.n_fft, cfg.hop_length) == (
        512,
        1536,
        8,
        100,
        1024,
        256,
    )
    n = Vocoder(cfg).num_parameters()
    assert abs(n - 13.5e6) / 13.5e6 < 0.05, n


# --------------------------------------------------------------------------- features + iSTFT


def test_mel_features_equal_torchaudio_melspectrogram():
    import torchaudio

    x = harmonic_clip(16000, 16000)[None]
    ours = MelFeatures(16000, 1024, 256, 80)(x)
    ref = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, hop_length=256, n_mels=80, power=1.0)(x)
    torch.testing.assert_close(ours, torch.log(ref.clamp_min(1e-5)), atol=1e-4, rtol=1e-4)
    assert ours.shape == (1, 80, 16000 // 256 + 1)
    # stays float32 when the module is cast to bf16 (DeepSpeed casts whole modules)
    assert MelFeatures(16000, 1024, 256, 80).to(torch.bfloat16)(x).dtype == torch.float32


@pytest.mark.parametrize("head", sorted(HEADS))
def test_istft_head_perfect_magnitude_and_phase_reconstruct_the_input(head):
    cfg = VocoderConfig.from_name(TINY[0], head=head)
    module = HEADS[head](cfg)
    y = 0.3 * harmonic_clip(8192, cfg.sample_rate)[None]  # amplitude keeps |S| under mag_clip
    spec = torch.stft(
        y,
        cfg.n_fft,
        cfg.hop_length,
        cfg.win_length,
        window=torch.hann_window(cfg.win_length),
        center=True,
        return_complex=True,
    )
    assert spec.abs().max() < cfg.mag_clip
    wave, s = module.synthesize(torch.log(spec.abs().clamp_min(1e-12)), torch.angle(spec))
    edge = cfg.n_fft
    assert wave.shape == y.shape
    err = (wave[:, edge:-edge] - y[:, edge:-edge]).abs().max().item()
    assert err < 1e-4, err
    torch.testing.assert_close(s.abs(), spec.abs(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", TINY)
def test_vocoder_shapes(preset):
    cfg = VocoderConfig.from_name(preset)
    model = Vocoder(cfg)
    mel = torch.randn(2, cfg.n_mels, cfg.segment_frames)
    wave, spec = model(mel)
    assert wave.shape == (2, cfg.segment_samples)
    assert spec.shape == (2, cfg.n_bins, cfg.segment_frames) and spec.is_complex()
    assert torch.isfinite(wave).all()
    if cfg.head == "splitband":
        assert len(model.head.bands) == 2 and 0 < cfg.split_bin < cfg.n_bins


def test_mrstft_loss_is_zero_for_identical_and_grows_with_noise():
    y = harmonic_clip(8192, 16000)[None]
    loss = MultiResolutionSTFTLoss([[512, 128, 512], [256, 64, 256]])
    assert loss(y, y)[0].item() < 1e-6
    small = loss(y + 0.01 * torch.randn_like(y), y)[0].item()
    big = loss(y + 0.3 * torch.randn_like(y), y)[0].item()
    assert 0 < small < big


def test_anti_wrapping_function_is_the_distance_to_the_nearest_full_turn():
    from megaray.models.audio.losses import anti_wrap

    x = torch.tensor([0.1, -0.1, 2 * math.pi + 0.1, -2 * math.pi - 0.1, math.pi - 0.1, 3 * math.pi - 0.1])
    expected = torch.tensor([0.1, 0.1, 0.1, 0.1, math.pi - 0.1, math.pi - 0.1])
    torch.testing.assert_close(anti_wrap(x), expected, atol=1e-6, rtol=0)


def test_phase_loss_sees_phase_not_magnitude_and_matches_apnet():
    """APNet (Ai & Ling 2023) eq. 5-9, computed here with numpy on the same STFTs: the loss is
    zero for the same phase at another loudness, positive for a delayed copy, and its gradient
    stays finite through silent bins."""
    import numpy as np

    from megaray.models.audio.losses import phase_loss
    from megaray.models.common.dsp import stft

    y = harmonic_clip(8192, 16000)[None]
    total, ip, gd, iaf = phase_loss(2.0 * y, y, 512, 128, 512)
    assert total.item() < 1e-4  # loudness is not phase
    shifted = torch.roll(y, 3, dims=-1)
    total, ip, gd, iaf = phase_loss(shifted, y, 512, 128, 512)
    torch.testing.assert_close(total, ip + gd + iaf)

    def aw(x):
        return np.abs(x - 2 * np.pi * np.round(x / (2 * np.pi)))

    a, b = stft(shifted, 512, 128, 512)[0].numpy(), stft(y, 512, 128, 512)[0].numpy()
    keep = (np.abs(a) > 1e-5) & (np.abs(b) > 1e-5)
    pa, pb = np.angle(a), np.angle(b)
    ref_ip = aw(pa - pb)[keep].mean()
    gd_keep = keep[1:] & keep[:-1]
    ref_gd = aw(np.diff(pa, axis=0) - np.diff(pb, axis=0))[gd_keep].mean()
    iaf_keep = keep[:, 1:] & keep[:, :-1]
    ref_iaf = aw(np.diff(pa, axis=1) - np.diff(pb, axis=1))[iaf_keep].mean()
    assert ip.item() > 0.1
    np.testing.assert_allclose([ip.item(), gd.item(), iaf.item()], [ref_ip, ref_gd, ref_iaf], rtol=1e-4)

    y_hat = (shifted.clone() * 0.5).requires_grad_(True)
    target = y.clone()
    target[..., :2048] = 0  # silence: phase undefined there
    phase_loss(y_hat, target, 512, 128, 512)[0].backward()
    assert torch.isfinite(y_hat.grad).all() and y_hat.grad.abs().sum() > 0


def test_vocoder_phase_weight_adds_the_phase_loss_and_its_parts():
    from megaray.tasks.vocoder import VocoderTask

    cfg = build_run_config({"model": {"family": "vocoder", "preset": TINY[0], "phase_weight": 10.0}})
    plain = build_run_config({"model": {"family": "vocoder", "preset": TINY[0]}})
    torch.manual_seed(0)
    task, base = VocoderTask(cfg), VocoderTask(plain)
    model = task.build_modules()["model"]
    y = torch.stack([harmonic_clip(8192, 16000, seed=s) for s in range(2)])
    batch = {"audio": y, "mel": model.features(y)}
    loss, m = task.loss(model, batch)
    loss0, m0 = base.loss(model, batch)
    assert {"phase", "phase_ip", "phase_gd", "phase_iaf"} <= set(m) and "phase" not in m0
    assert loss.item() == pytest.approx(loss0.item() + 10.0 * m["phase"], rel=1e-5)


def test_stft_windows_are_built_once_and_survive_inference_mode():
    from megaray.models.common.dsp import hann_window, stft

    hann_window.cache_clear()
    with torch.inference_mode():
        stft(torch.randn(1, 4096), 512, 128)
    x = torch.randn(1, 4096, requires_grad=True)
    stft(x, 512, 128).abs().sum().backward()  # the cached window is not an inference tensor
    assert hann_window.cache_info().hits >= 1 and hann_window.cache_info().currsize == 1
    assert torch.isfinite(x.grad).all()


def test_vocoder_overfits_one_clip():
    """A few hundred AdamW steps on one clip at least halve the multi-resolution STFT loss."""
    torch.manual_seed(0)
    cfg = VocoderConfig.from_name(TINY[0])
    model = Vocoder(cfg)
    mrstft = MultiResolutionSTFTLoss(cfg.mrstft_resolutions)
    y = harmonic_clip(cfg.segment_samples, cfg.sample_rate)[None]
    mel = model.features(y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        first = mrstft(model(mel)[0], y)[0].item()
    for _ in range(200):
        y_hat, _ = model(mel)
        loss = cfg.mel_weight * mel_l1(model.features, y_hat, y) + mrstft(y_hat, y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = mrstft(model(mel)[0], y)[0].item()
    assert last < 0.5 * first, (first, last)


def test_vocode_file_roundtrip(tmp_path):
    import soundfile as sf

    cfg = VocoderConfig.from_name(TINY[1])
    src = tmp_path / "in.wav"
    sf.write(src, harmonic_clip(22050, 22050).numpy(), 22050)  # other rate: resampled to 16 kHz
    out = tmp_path / "sub" / "out.wav"
    stats = vocode_file(Vocoder(cfg), cfg, str(src), str(out))
    audio, sr = sf.read(out)
    assert sr == cfg.sample_rate
    assert abs(len(audio) - cfg.sample_rate) <= cfg.hop_length
    assert stats["rtf"] > 0 and stats["seconds"] == pytest.approx(len(audio) / sr)


# --------------------------------------------------------------------------- GAN


def test_discriminators_output_logits_and_feature_maps():
    cfg = VocoderConfig.from_name(TINY[0], adversarial=True)
    disc = AudioDiscriminator(cfg)
    out = disc(torch.randn(2, 8192))
    assert len(out) == len(cfg.mpd_periods) + len(cfg.mrd_resolutions)
    for logits, fmaps in out:
        assert logits.dim() == 2 and logits.shape[0] == 2 and len(fmaps) >= 2


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _changed(before, m):
    return sum(float((a - b.detach()).abs().sum()) for a, b in zip(before, m.parameters()))


def test_gan_train_step_updates_generator_and_discriminator_after_warmup():
    from megaray.tasks.vocoder import VocoderTask

    torch.manual_seed(0)
    cfg = build_run_config(
        {"model": {"family": "vocoder", "preset": TINY[0], "adversarial": True, "adv_start_step": 2}}
    )
    task = VocoderTask(cfg)
    mods = task.build_modules()
    assert set(mods) == {"model", "disc"}
    engines = {k: StandInEngine(v) for k, v in mods.items()}
    y = torch.stack([harmonic_clip(8192, 16000, seed=s) for s in range(2)])
    batch = {"audio": y, "mel": mods["model"].features(y), "speaker_id": torch.zeros(2, dtype=torch.int64)}

    g0, d0 = _params(mods["model"]), _params(mods["disc"])
    m = task.train_step(engines, batch, step=0)  # warmup: reconstruction only
    assert "loss_disc" not in m and engines["disc"].steps == 0
    assert _changed(g0, mods["model"]) > 0 and _changed(d0, mods["disc"]) == 0

    g1, d1 = _params(mods["model"]), _params(mods["disc"])
    m = task.train_step(engines, batch, step=2)  # adversarial from adv_start_step on
    assert {"loss_disc", "loss_gen_adv", "loss_fm"} <= set(m) and all(math.isfinite(v) for v in m.values())
    assert m["loss"] > m["loss_recon"]
    assert engines["disc"].steps == 1 and engines["model"].steps == 2
    assert _changed(g1, mods["model"]) > 0 and _changed(d1, mods["disc"]) > 0
    # the generator's backward left no gradient on the discriminator, which is trainable again
    assert all(p.grad is None and p.requires_grad for p in mods["disc"].parameters())


# --------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("preset", ["small", "small_wide", "tiny"])
def test_vae_latent_shapes_follow_downsampling(preset):
    cfg = AudioVAEConfig.from_name(preset)
    vae = AudioVAE(cfg).eval()
    T = 64
    mel = torch.randn(2, cfg.n_mels, T)
    mu, logvar = vae.encode(mel)
    assert mu.shape == logvar.shape == (2, cfg.latent_channels, cfg.n_mels // cfg.down_freq, T // cfg.down_time)
    recon, mu2, _ = vae(mel, speaker_id=torch.tensor([0, 1]))
    assert recon.shape == mel.shape
    torch.testing.assert_close(mu, mu2)
    # frames that are not a multiple of down_time are padded and cropped back
    odd = torch.randn(1, 1, cfg.n_mels, T + 1)
    assert vae(odd, speaker_id=torch.tensor([3]))[0].shape == odd.shape


@pytest.mark.parametrize("speaker_source", ["table", "vector"])
def test_reference_geometry_maps_80_mels_by_750_frames_to_a_10_by_10_latent(speaker_source):
    """The reference audio-VAE shape: mel ``[1, 80, T]`` -> latent ``[C, 10, T/75]`` (time 75 =
    5 x 5 x 3, frequency 8 = 2 x 2 x 2), and back; a 192-d speaker vector (ECAPA-TDNN's width)
    or a table id conditions the decoder."""
    cfg = AudioVAEConfig.from_name("small_75x8", speaker_source=speaker_source)
    assert cfg.stage_strides("time") == [5, 5, 3] and cfg.stage_strides("freq") == [2, 2, 2]
    assert cfg.segment_frames == 750
    vae = AudioVAE(cfg).eval()
    speaker = (
        {"speaker_id": torch.tensor([2])} if speaker_source == "table" else {"speaker_vector": torch.randn(1, 192)}
    )
    mel = torch.randn(1, 1, 80, 750)
    mu, _ = vae.encode(mel)
    assert mu.shape == (1, cfg.latent_channels, 10, 10)
    assert vae.decode(mu, **speaker).shape == (1, 1, 80, 750)
    recon, _, _ = vae(mel, **speaker)
    assert recon.shape == mel.shape
    # every input frame reaches the latent (the stride-5 kernels overlap: no frame falls between windows)
    mel.requires_grad_(True)
    vae.encode(mel)[0].sum().backward()
    assert (mel.grad.abs().sum(dim=(0, 1, 2)) > 0).all()


def test_vae_speaker_conditions_the_decoder_not_the_latent():
    torch.manual_seed(0)
    cfg = AudioVAEConfig.from_name("tiny")
    vae = AudioVAE(cfg).eval()
    # the encoder has no speaker input at all; only the decoder takes one
    enc_params = set(inspect.signature(vae.encode).parameters)
    assert enc_params == {"mel"}
    assert not any("speaker" in n or "film" in n for n, _ in vae.encoder.named_parameters())
    assert {"speaker_id", "speaker_vector"} <= set(inspect.signature(vae.decode).parameters)
    # FiLM starts as identity; give it weights to see the speaker move the output
    for block in list(vae.decoder.blocks) + [vae.decoder.out_block]:
        torch.nn.init.normal_(block.film.weight, std=0.5)
    mel = torch.randn(1, cfg.n_mels, 32)
    with torch.no_grad():
        z, _ = vae.encode(mel)
        a = vae.decode(z, speaker_id=torch.tensor([0]))
        b = vae.decode(z, speaker_id=torch.tensor([1]))
        ra, mua, _ = vae(mel, speaker_id=torch.tensor([0]))
        rb, mub, _ = vae(mel, speaker_id=torch.tensor([1]))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(mua, mub)  # same latent whatever the speaker
    assert (ra - rb).abs().max() > 1e-3


def test_vae_speaker_vector_source_and_loss_backward():
    cfg = AudioVAEConfig.from_name("tiny", speaker_source="vector")
    vae = AudioVAE(cfg)
    assert cfg.speaker_vector_dim == 192
    mel = torch.randn(2, cfg.n_mels, 32)
    recon, mu, logvar = vae(mel, speaker_vector=torch.randn(2, 192))
    loss = torch.nn.functional.l1_loss(recon, mel) + cfg.kl_weight * kl_divergence(mu, logvar)
    loss.backward()
    assert vae.speaker.proj.weight.grad is not None
    with pytest.raises(ValueError, match="speaker_vector"):
        vae(mel, speaker_id=torch.tensor([0, 1]))


def test_vae_task_loss_decreases_on_one_batch():
    from megaray.tasks.audio_vae import AudioVAETask

    torch.manual_seed(0)
    cfg = build_run_config({"model": {"family": "audio_vae", "preset": "tiny"}})
    task = AudioVAETask(cfg)
    model = task.build_modules()["model"]
    engine = StandInEngine(model, lr=3e-3)
    y = torch.stack([harmonic_clip(8192, 16000, seed=s) for s in range(2)])
    mel = MelFeatures(16000, 512, 128, 80)(y)
    batch = {"mel": mel, "speaker_id": torch.tensor([0, 1])}
    first = task.eval_step({"model": model}, batch)
    for step in range(30):
        task.train_step({"model": engine}, batch, step)
    last = task.eval_step({"model": model}, batch)
    assert {"val_loss", "val_mel_l1", "val_kl"} <= set(last)
    assert last["val_mel_l1"] < 0.7 * first["val_mel_l1"], (first, last)
