"""AudioVAETask: speaker-conditioned log-mel VAE training (``model.family: audio_vae``)."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megaray.config import ConfigError
from megaray.tasks.audio import AudioTask, plot_mels
from megaray.tasks.base import unwrap


class AudioVAETask(AudioTask):
    """Log-mel ``(B, n_mels, F)`` -> latent -> log-mel, conditioned on a speaker id or vector.

    Loss: ``recon (L1 or MSE on the log-mel) + kl_weight * KL`` (KL as a per-element mean;
    Kingma & Welling 2014).
    """

    unit = "frames"

    def _check_manifest(self, man: Dict[str, Any]) -> None:
        m = self.cfg.model
        if m.speaker_source == "vector":
            dim = man.get("speaker_vector_dim")
            if not dim:
                raise ConfigError(
                    "model.speaker_source: 'vector' needs shards with a speaker_vector column "
                    "(add speaker_vector to the source manifest) or use 'table'"
                )
            if dim != m.speaker_vector_dim:
                raise ConfigError(
                    f"model.speaker_vector_dim: shards hold {dim}-dim vectors, model expects {m.speaker_vector_dim}"
                )
        elif len(man.get("speakers", {})) > m.num_speakers:
            raise ConfigError(
                f"model.num_speakers ({m.num_speakers}) is smaller than the {len(man['speakers'])} "
                f"speakers in {self.cfg.data.shards}; set model.num_speakers >= {len(man['speakers'])}"
            )

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["mel"].shape[0] * batch["mel"].shape[-1])

    def _speaker(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
        if self.cfg.model.speaker_source == "vector":
            return {"speaker_vector": batch["speaker_vector"]}
        return {"speaker_id": batch["speaker_id"]}

    def _terms(self, model: Any, batch: Mapping[str, torch.Tensor], sample: Optional[bool] = None):
        from megaray.models.audio.vae import kl_divergence

        mel = batch["mel"]
        recon, mu, logvar = model(mel, sample=sample, **self._speaker(batch))
        recon = recon.float()
        rec = F.l1_loss(recon, mel) if self.cfg.model.recon_loss == "l1" else F.mse_loss(recon, mel)
        kl = kl_divergence(mu, logvar)
        loss = rec + self.cfg.model.kl_weight * kl
        return (
            loss,
            recon,
            {"recon": float(rec.detach()), "kl": float(kl.detach()), "mel_l1": float(F.l1_loss(recon.detach(), mel))},
        )

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss, _, metrics = self._terms(model, batch)
        return loss, metrics

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss``, ``val_mel_l1`` (posterior mean, no sampling) and ``val_kl``."""
        loss, _, metrics = self._terms(modules["model"], batch, sample=False)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``clipN_mel.png`` (input vs reconstructed log-mel) and Griffin-Lim renderings
        ``clipN_input_griffinlim.wav`` / ``clipN_recon_griffinlim.wav`` (no vocoder needed;
        deterministic: it draws no random numbers, so evaluation leaves training's RNG alone)."""
        import soundfile as sf

        from megaray.models.common.dsp import griffin_lim

        net = unwrap(modules["model"])
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        m = self.cfg.model
        for i, ex in enumerate(self._examples()):
            _, mel = self._crop_example(ex)
            spk = (
                {"speaker_vector": torch.from_numpy(ex["speaker_vector"])[None].to(device)}
                if m.speaker_source == "vector"
                else {"speaker_id": torch.tensor([ex["speaker_id"]], device=device)}
            )
            recon, _, _ = net(mel[None].to(device), sample=False, **spk)
            recon = recon[0].float().cpu()
            plot_mels(
                os.path.join(out_dir, f"clip{i}_mel.png"),
                [(f"input {ex['name']} ({ex['speaker']})", mel), (f"VAE reconstruction, step {step}", recon)],
                m.sample_rate,
                m.hop_length,
            )
            for tag, x in (("input", mel), ("recon", recon)):
                wave = griffin_lim(x, m.sample_rate, m.n_fft, m.hop_length)
                sf.write(os.path.join(out_dir, f"clip{i}_{tag}_griffinlim.wav"), wave.numpy(), m.sample_rate)
        net.train(was_training)
        return {}
