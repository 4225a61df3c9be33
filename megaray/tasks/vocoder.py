"""VocoderTask: Vocos-style vocoder training, GAN-capable (``model.family: vocoder``)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import torch

from megaray.config import ConfigError
from megaray.tasks.adversarial import AdversarialStep
from megaray.tasks.audio import AudioTask, plot_mels
from megaray.tasks.base import Engine, unwrap


class VocoderTask(AudioTask):
    """Log-mel ``(B, n_mels, F)`` -> waveform ``(B, (F - 1) * hop)``.

    Generator loss: ``mel_weight * mel_L1 + mrstft_weight * MR-STFT`` (``+ phase_weight *``
    APNet's anti-wrapping phase loss when set) and, when
    ``model.adversarial`` and ``step >= adv_start_step``, ``adv_weight * LSGAN + fm_weight *
    feature matching`` against MPD + MRD discriminators (HiFi-GAN, Kong et al. 2020; Vocos,
    Siuzdak 2023) through :class:`~megaray.tasks.adversarial.AdversarialStep`. The
    discriminator is a second module (``"disc"``) with its own DeepSpeed engine and optimizer
    (settings in ``train.modules.disc``), updated first in each step.
    """

    def __init__(self, cfg, info=None):
        super().__init__(cfg, info)
        from megaray.models.audio.losses import (
            MultiResolutionSTFTLoss,
            discriminator_loss,
            feature_matching_loss,
            generator_adv_loss,
        )

        m = cfg.model
        self.mrstft = MultiResolutionSTFTLoss(m.mrstft_resolutions)
        self.adversarial = AdversarialStep(
            discriminator_loss,
            generator_adv_loss,
            feature_matching_loss,
            start_step=m.adv_start_step,
            adv_weight=m.adv_weight,
            fm_weight=m.fm_weight,
        )

    def module_names(self) -> List[str]:
        return ["model", "disc"] if self.cfg.model.adversarial else ["model"]

    def build_modules(self) -> Dict[str, torch.nn.Module]:
        from megaray.models.audio.discriminators import AudioDiscriminator
        from megaray.models.audio.vocoder import Vocoder

        mods: Dict[str, torch.nn.Module] = {"model": Vocoder(self.cfg.model)}
        if self.cfg.model.adversarial:
            mods["disc"] = AudioDiscriminator(self.cfg.model)
        return mods

    def _check_manifest(self, man: Dict[str, Any]) -> None:
        m = self.cfg.model
        if man.get("win_length", man.get("n_fft")) != m.win_length:
            raise ConfigError(f"model.win_length: shards use win_length={man.get('win_length')}, model {m.win_length}")
        if m.f_min != 0 or m.f_max not in (None, m.sample_rate / 2):
            raise ConfigError("model.f_min/f_max: prepare_audio computes mels over 0..sample_rate/2; keep the defaults")

    def _recon(self, model: Any, batch: Mapping[str, torch.Tensor]):
        from megaray.models.audio.losses import mel_l1, phase_loss

        y_hat, _ = model(batch["mel"])  # (B, S)
        y = batch["audio"][..., : y_hat.shape[-1]]
        mel = mel_l1(unwrap(model).features, y_hat, y)
        mr, sc, mag = self.mrstft(y_hat, y)
        m = self.cfg.model
        loss = m.mel_weight * mel + m.mrstft_weight * mr
        metrics = {
            "mel_l1": float(mel.detach()),
            "mrstft": float(mr.detach()),
            "spectral_convergence": float(sc.detach()),
            "log_mag": float(mag.detach()),
        }
        if m.phase_weight > 0:
            phase, ip, gd, iaf = phase_loss(y_hat, y, m.n_fft, m.hop_length, m.win_length)
            loss = loss + m.phase_weight * phase
            metrics.update(
                phase=float(phase.detach()),
                phase_ip=float(ip.detach()),
                phase_gd=float(gd.detach()),
                phase_iaf=float(iaf.detach()),
            )
        return loss, y_hat, y, metrics

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Reconstruction loss only (mel L1 + MR-STFT); the GAN terms live in :meth:`train_step`."""
        loss, _, _, metrics = self._recon(model, batch)
        return loss, metrics

    def adversarial_active(self, step: int) -> bool:
        """Whether the discriminator trains and the GAN losses apply at optimizer step ``step``."""
        return bool(self.cfg.model.adversarial) and self.adversarial.active(step)

    def train_step(
        self, engines: Mapping[str, Engine], batch: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, float]:
        """One micro-batch: discriminator update (from ``adv_start_step``), then generator update.

        ``engines``: ``{"model": generator engine, "disc": discriminator engine}`` (DeepSpeed
        engines or anything with ``__call__``, ``backward(loss)`` and ``step()``).
        """
        gen = engines["model"]
        loss_g, y_hat, y, metrics = self._recon(gen, batch)
        metrics["loss_recon"] = float(loss_g.detach())
        loss_g, gan = self.adversarial(engines.get("disc"), y, y_hat, loss_g, step)
        metrics.update(gan)
        gen.backward(loss_g)
        gen.step()
        return {"loss": float(loss_g.detach()), **metrics}

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss`` (reconstruction), ``val_mel_l1`` and ``val_mrstft`` on fixed val crops."""
        loss, _, _, metrics = self._recon(modules["model"], batch)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """For the first validation clips: ``clipN_input.wav``, ``clipN_vocoded.wav`` and
        ``clipN_mel.png`` (input log-mel above the vocoded audio's log-mel)."""
        import soundfile as sf

        net = unwrap(modules["model"])
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        m = self.cfg.model
        texts = []
        for i, ex in enumerate(self._examples()):
            wave, mel = self._crop_example(ex)
            out, _ = net(mel[None].to(device))
            audio = out[0].float().clamp(-1, 1).cpu()
            sf.write(os.path.join(out_dir, f"clip{i}_input.wav"), wave.numpy(), m.sample_rate)
            sf.write(os.path.join(out_dir, f"clip{i}_vocoded.wav"), audio.numpy(), m.sample_rate)
            mel_out = net.features(audio[None].to(device))[0]
            plot_mels(
                os.path.join(out_dir, f"clip{i}_mel.png"),
                [(f"input {ex['name']} ({ex['speaker']})", mel), (f"vocoded, step {step}", mel_out)],
                m.sample_rate,
                m.hop_length,
            )
            texts.append(f"clip{i}: {ex['name']} [{ex['speaker']}] {ex['text']}")
        net.train(was_training)
        return {"audio_clips": "\n".join(texts)} if texts else {}
