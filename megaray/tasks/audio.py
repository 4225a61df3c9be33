"""Training tasks of the audio families: :class:`VocoderTask` (GAN-capable) and :class:`AudioVAETask`.

Both read shards written by :func:`megaray.data.audio.prepare_audio`; batches are
``{"audio": (B, S) float32, "mel": (B, n_mels, S // hop + 1) float32, "speaker_id": (B,) int64}``
(plus ``speaker_vector`` ``(B, D)`` when the shards carry one).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megaray.config import ConfigError
from megaray.tasks.base import Task


def _unwrap(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class _AudioTask(Task):
    """Shared data plumbing: shard/config consistency checks and rank-equal batch counts."""

    unit = "samples"
    #: validation clips rendered by :meth:`eval_artifacts`
    n_artifacts: int = 2
    #: longest clip (seconds) rendered by :meth:`eval_artifacts`
    artifact_seconds: float = 8.0

    def _expect(self) -> Dict[str, Any]:
        m = self.cfg.model
        return {"sample_rate": m.sample_rate, "n_mels": m.n_mels, "n_fft": m.n_fft, "hop_length": m.hop_length}

    def datasets(self) -> Dict[str, Any]:
        from megaray.data import audio

        shards = self.cfg.data.shards
        try:
            man = audio.read_manifest(shards)
        except FileNotFoundError as e:
            raise ConfigError(f"data.shards: {e}") from None
        if man.get("kind") != "audio":
            raise ConfigError(f"data.shards: {shards} holds {man.get('kind')!r} shards, not audio (run `megaray prepare audio`)")
        for key, want in self._expect().items():
            if man.get(key) != want:
                raise ConfigError(
                    f"model.{key}: the model needs {key}={want} but {shards} was prepared with {key}={man.get(key)}; "
                    f"set model.{key}={man.get(key)} or re-prepare the audio"
                )
        self._check_manifest(man)
        world, B = self.cfg.scaling.num_workers, self.cfg.data.batch_size
        n_train, n_val = man["splits"]["train"]["clips"], man["splits"]["val"]["clips"]
        bpe = n_train // (world * B)
        if bpe < self.cfg.train.grad_accum_steps:
            raise ConfigError(
                f"data: {shards} has {n_train} training clips, too few for {world} workers x batch_size {B} "
                f"x grad_accum_steps {self.cfg.train.grad_accum_steps}; prepare more audio or lower data.batch_size"
            )
        if n_val < 1:
            raise ConfigError(f"data: {shards} has no validation clips; prepare with val_fraction > 0")
        repeats = max(1, math.ceil(world * B / n_val))  # extra fixed crops per val clip for tiny val sets
        val_batches = min(self.cfg.data.num_val_batches, (n_val * repeats) // (world * B))
        self.info.update(batches_per_epoch=bpe, val_batches=val_batches, train_clips=n_train, val_clips=n_val,
                         val_repeats=repeats, speakers=man.get("speakers", {}))
        return audio.audio_datasets(
            shards, self.cfg.model.segment_samples, seed=self.cfg.train.seed, expect=self._expect(), val_repeats=repeats,
        )

    def _check_manifest(self, man: Dict[str, Any]) -> None:
        """Family-specific checks of the shard manifest (raise ConfigError)."""

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["audio"].numel()) if "audio" in batch else int(next(iter(batch.values())).shape[0])

    def _examples(self) -> List[Dict[str, Any]]:
        if not hasattr(self, "_example_cache"):
            from megaray.data.audio import load_examples

            self._example_cache = load_examples(self.cfg.data.shards, "val", self.n_artifacts)
        return self._example_cache

    def _crop_example(self, ex: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        hop = self.cfg.model.hop_length
        frames = int(self.artifact_seconds * self.cfg.model.sample_rate) // hop
        mel = torch.from_numpy(ex["mel"][:, : frames + 1])
        wave = torch.from_numpy(ex["waveform"][: frames * hop])
        return wave, mel


def plot_mels(path: str, panels: List[Tuple[str, Any]], sample_rate: int, hop_length: int) -> str:
    """Save log-mels ``(n_mels, F)`` stacked vertically (matplotlib Agg, the first panel's colour
    scale for all) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    mels = [m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else m for _, m in panels]
    vmin, vmax = float(mels[0].min()), float(mels[0].max())  # one colour scale: the first panel's
    for ax, (title, _), mel in zip(axes[:, 0], panels, mels):
        seconds = mel.shape[-1] * hop_length / sample_rate
        im = ax.imshow(mel, origin="lower", aspect="auto", interpolation="none", vmin=vmin, vmax=vmax,
                       extent=[0, seconds, 0, mel.shape[0]])
        ax.set_title(title)
        ax.set_ylabel("mel band")
        fig.colorbar(im, ax=ax, label="log magnitude")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- vocoder


class VocoderTask(_AudioTask):
    """Vocos-style vocoder training (``model.family: vocoder``).

    Generator loss: ``mel_weight * mel_L1 + mrstft_weight * MR-STFT`` and, when
    ``model.adversarial`` and ``step >= adv_start_step``, ``adv_weight * LSGAN + fm_weight *
    feature matching`` against MPD + MRD discriminators. The discriminator is a second module
    (``"disc"``) with its own DeepSpeed engine and optimizer, updated first in each step.
    """

    def __init__(self, cfg, info: Optional[Dict[str, Any]] = None):
        super().__init__(cfg, info)
        from megaray.models.audio.losses import MultiResolutionSTFTLoss

        self.mrstft = MultiResolutionSTFTLoss(cfg.model.mrstft_resolutions)

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
        from megaray.models.audio.losses import mel_l1

        y_hat, _ = model(batch["mel"])  # (B, S)
        y = batch["audio"][..., : y_hat.shape[-1]]
        mel = mel_l1(_unwrap(model).features, y_hat, y)
        mr, sc, mag = self.mrstft(y_hat, y)
        loss = self.cfg.model.mel_weight * mel + self.cfg.model.mrstft_weight * mr
        return loss, y_hat, y, {"mel_l1": float(mel.detach()), "mrstft": float(mr.detach()),
                                "spectral_convergence": float(sc.detach()), "log_mag": float(mag.detach())}

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Reconstruction loss only (mel L1 + MR-STFT); the GAN terms live in :meth:`train_step`."""
        loss, _, _, metrics = self._recon(model, batch)
        return loss, metrics

    def adversarial_active(self, step: int) -> bool:
        """Whether the discriminator trains and the GAN losses apply at optimizer step ``step``."""
        return bool(self.cfg.model.adversarial) and step >= self.cfg.model.adv_start_step

    def train_step(self, engines: Mapping[str, Any], batch: Mapping[str, torch.Tensor], step: int) -> Dict[str, float]:
        """One micro-batch: discriminator update (after ``adv_start_step``), then generator update.

        ``engines``: ``{"model": generator engine, "disc": discriminator engine}`` (DeepSpeed
        engines or anything with ``__call__``, ``backward(loss)`` and ``step()``).
        """
        from megaray.models.audio.losses import discriminator_loss, feature_matching_loss, generator_adv_loss

        m = self.cfg.model
        gen, disc = engines["model"], engines.get("disc")
        loss_g, y_hat, y, metrics = self._recon(gen, batch)
        metrics["loss_recon"] = float(loss_g.detach())
        if disc is not None and self.adversarial_active(step):
            # discriminator: real vs detached fake
            loss_d = discriminator_loss(disc(y), disc(y_hat.detach()))
            disc.backward(loss_d)
            disc.step()
            # generator: fool the (frozen) discriminator, match its features on real audio
            d_module = _unwrap(disc)
            _set_requires_grad(d_module, False)
            try:
                fake = disc(y_hat)
                with torch.no_grad():
                    real = disc(y)
                adv, fm = generator_adv_loss(fake), feature_matching_loss(real, fake)
            finally:
                _set_requires_grad(d_module, True)
            loss_g = loss_g + m.adv_weight * adv + m.fm_weight * fm
            metrics.update(loss_disc=float(loss_d.detach()), loss_gen_adv=float(adv.detach()), loss_fm=float(fm.detach()))
        gen.backward(loss_g)
        gen.step()
        return {"loss": float(loss_g.detach()), **metrics}

    @torch.no_grad()
    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss`` (reconstruction), ``val_mel_l1`` and ``val_mrstft`` on fixed val crops."""
        loss, _, _, metrics = self._recon(model, batch)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    @torch.no_grad()
    def eval_artifacts(self, model: torch.nn.Module, out_dir: str, step: int) -> Dict[str, Any]:
        """For the first validation clips: ``clipN_input.wav``, ``clipN_vocoded.wav`` and
        ``clipN_mel.png`` (input log-mel above the vocoded audio's log-mel)."""
        import soundfile as sf

        net = _unwrap(model)
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
            plot_mels(os.path.join(out_dir, f"clip{i}_mel.png"),
                      [(f"input {ex['name']} ({ex['speaker']})", mel), (f"vocoded, step {step}", mel_out)],
                      m.sample_rate, m.hop_length)
            texts.append(f"clip{i}: {ex['name']} [{ex['speaker']}] {ex['text']}")
        net.train(was_training)
        return {"audio_clips": "\n".join(texts)} if texts else {}


# --------------------------------------------------------------------------- audio VAE


class AudioVAETask(_AudioTask):
    """Speaker-conditioned log-mel VAE training (``model.family: audio_vae``).

    Loss: ``recon (L1 or MSE on the log-mel) + kl_weight * KL`` (KL as a per-element mean).
    """

    unit = "frames"

    def _check_manifest(self, man: Dict[str, Any]) -> None:
        m = self.cfg.model
        if m.speaker_source == "vector":
            dim = man.get("speaker_vector_dim")
            if not dim:
                raise ConfigError("model.speaker_source: 'vector' needs shards with a speaker_vector column "
                                  "(add speaker_vector to the source manifest) or use 'table'")
            if dim != m.speaker_vector_dim:
                raise ConfigError(f"model.speaker_vector_dim: shards hold {dim}-dim vectors, model expects {m.speaker_vector_dim}")
        elif len(man.get("speakers", {})) > m.num_speakers:
            raise ConfigError(f"model.num_speakers ({m.num_speakers}) is smaller than the {len(man['speakers'])} "
                              f"speakers in {self.cfg.data.shards}; set model.num_speakers >= {len(man['speakers'])}")

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
        return loss, recon, {"recon": float(rec.detach()), "kl": float(kl.detach()),
                             "mel_l1": float(F.l1_loss(recon.detach(), mel))}

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss, _, metrics = self._terms(model, batch)
        return loss, metrics

    @torch.no_grad()
    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss``, ``val_mel_l1`` (posterior mean, no sampling) and ``val_kl``."""
        loss, _, metrics = self._terms(model, batch, sample=False)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    @torch.no_grad()
    def eval_artifacts(self, model: torch.nn.Module, out_dir: str, step: int) -> Dict[str, Any]:
        """``clipN_mel.png`` (input vs reconstructed log-mel) and Griffin-Lim renderings
        ``clipN_input_griffinlim.wav`` / ``clipN_recon_griffinlim.wav`` (no vocoder needed)."""
        import soundfile as sf

        net = _unwrap(model)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        m = self.cfg.model
        for i, ex in enumerate(self._examples()):
            _, mel = self._crop_example(ex)
            spk = ({"speaker_vector": torch.from_numpy(ex["speaker_vector"])[None].to(device)}
                   if m.speaker_source == "vector" else {"speaker_id": torch.tensor([ex["speaker_id"]], device=device)})
            recon, _, _ = net(mel[None].to(device), sample=False, **spk)
            recon = recon[0].float().cpu()
            plot_mels(os.path.join(out_dir, f"clip{i}_mel.png"),
                      [(f"input {ex['name']} ({ex['speaker']})", mel), (f"VAE reconstruction, step {step}", recon)],
                      m.sample_rate, m.hop_length)
            for tag, x in (("input", mel), ("recon", recon)):
                sf.write(os.path.join(out_dir, f"clip{i}_{tag}_griffinlim.wav"), griffin_lim(x, m).numpy(), m.sample_rate)
        net.train(was_training)
        return {}


def griffin_lim(log_mel: torch.Tensor, cfg: Any, n_iter: int = 32) -> torch.Tensor:
    """Log-mel ``(n_mels, F)`` -> waveform ``((F-1)*hop,)``: pseudo-inverse of the mel filterbank
    (rank-deficient banks are fine), then Griffin-Lim (torchaudio), peak-normalised to 0.9.
    A listening aid, not a vocoder."""
    import torchaudio
    import torchaudio.functional as AF

    fb = AF.melscale_fbanks(cfg.n_fft // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.n_mels, cfg.sample_rate,
                            norm=None, mel_scale="htk")  # (bins, n_mels)
    mag = torch.exp(log_mel.float())  # (n_mels, F)
    spec = (torch.linalg.pinv(fb.T) @ mag).clamp_min(0)  # (bins, F)
    gl = torchaudio.transforms.GriffinLim(cfg.n_fft, n_iter=n_iter, hop_length=cfg.hop_length, power=1.0)
    wave = gl(spec)
    return wave / wave.abs().max().clamp_min(1e-6) * 0.9
