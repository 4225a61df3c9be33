"""MelDiffusionTask: a DiT trained on log-mels of speech (``megaray prepare audio`` shards).

Log-mels of whole clips, cropped from their start (or padded) to ``model.input_size = [n_mels,
frames]`` and normalised with ``diffusion.mel_mean / mel_std``, seen as 1-channel images,
text-conditioned on the clips' transcripts (byte ids through the DiT's learned embedding, or a
frozen GPT / T5 encoder: :class:`~megaray.tasks.diffusion.TextEncoder`). Eval samples are a mel
PNG and, with ``diffusion.vocoder_checkpoint``, wav files. What the two DiT tasks share is
:class:`~megaray.tasks.diffusion.DiffusionTask`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch

from megaray.config import ConfigError
from megaray.tasks.base import unwrap
from megaray.tasks.diffusion import DiffusionTask, check_vocoder, load_frozen


class MelDiffusionTask(DiffusionTask):
    """DiT training on log-mels ``(1, n_mels, frames)``, conditioned on the clips' transcripts."""

    kind = "audio"

    # -- data ------------------------------------------------------------------------------
    def _segment(self, man: Mapping[str, Any]) -> int:
        """Samples of audio per crop: ``frames`` mel frames (``model.input_size[1]``)."""
        return (self.cfg.model.grid_input[1] - 1) * int(man["hop_length"])

    def _datasets(self, shards: str, man: Dict[str, Any]) -> Dict[str, Any]:
        from megaray.data.audio import audio_datasets, load_examples

        m, d = self.cfg.model, self.cfg.diffusion
        n_mels, _ = m.grid_input
        if m.in_channels != 1 or n_mels != man["n_mels"]:
            raise ConfigError(
                f"model.input_size / in_channels: a mel DiT takes (1, n_mels, frames) inputs; {shards} "
                f"has n_mels={man['n_mels']}, so set model.in_channels=1 and model.input_size="
                f"[{man['n_mels']}, FRAMES] (got in_channels={m.in_channels}, input_size={m.input_size})"
            )
        self._check_text_model()
        vocoder = d.vocoder_checkpoint and check_vocoder(d.vocoder_checkpoint, man, "diffusion.vocoder_checkpoint")
        n_train, n_val = man["splits"]["train"]["clips"], man["splits"]["val"]["clips"]
        # tiny val sets: every clip several times, so each rank gets a full batch
        repeats = max(1, math.ceil(self.cfg.scaling.max_workers * self.cfg.data.batch_size / max(1, n_val)))
        texts = [ex["text"] for ex in load_examples(shards, "val", d.n_samples)]
        self._set_info(
            man,
            n_train,
            n_val * repeats,
            shards,
            texts=texts,
            vocoder_checkpoint=vocoder,
            mel={k: int(man[k]) for k in ("sample_rate", "n_mels", "n_fft", "hop_length")},
        )
        return audio_datasets(
            shards,
            self._segment(man),
            seed=self.cfg.train.seed,
            from_start=True,
            text_max_len=d.text_max_len,
            val_repeats=repeats,
            on_corrupt=self.cfg.data.on_corrupt,
        )

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """The training clips' mels cropped from the clip's start with their transcripts' byte ids
        (:func:`megaray.tasks.audio.crop_stream`), in the world-independent served order of
        :mod:`megaray.data.rows` from sample ``cursor`` of ``epoch`` on; blocks of
        ``plan.micro_batch`` rows."""
        from megaray.tasks.audio import crop_stream

        man = self.info.manifest
        return crop_stream(
            self.cfg,
            man,
            plan,
            epoch,
            cursor,
            segment=self._segment(man),
            from_start=True,
            text_max_len=self.cfg.diffusion.text_max_len,
        )

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare audio --source espeak --out {shards} --n-mels {self.cfg.model.grid_input[0]}"

    def collate(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
        """``{"x": (B, 1, n_mels, frames)}`` normalised log-mels, ``"text_ids"``/``"text_mask"``."""
        d = self.cfg.diffusion
        x = (batch["mel"].to(device).float()[:, None] - d.mel_mean) / d.mel_std
        return {"x": x, "text_ids": batch["text_ids"].to(device), "text_mask": batch["text_mask"].to(device)}

    # -- modules ---------------------------------------------------------------------------
    def decoders(self) -> Dict[str, torch.nn.Module]:
        """``{"vocoder": the frozen vocoder}`` with ``diffusion.vocoder_checkpoint``, else none."""
        return {"vocoder": load_frozen(self.info.vocoder_checkpoint)} if self.info.vocoder_checkpoint else {}

    # -- samples ---------------------------------------------------------------------------
    @torch.no_grad()
    def render(
        self,
        x: torch.Tensor,
        modules: Mapping[str, torch.nn.Module],
        prefix: str,
        titles: Optional[List[str]] = None,
        step: Optional[int] = None,
    ) -> List[str]:
        """``<prefix>_mel.png`` (the mels of ``x`` ``(n, 1, n_mels, frames)``, titled with
        ``titles`` and ``step``) and, when ``modules`` holds a ``vocoder``, ``<prefix>N.wav``
        (PCM 16, the shards' sample rate). Returns the paths written."""
        import soundfile as sf

        from megaray.tasks.audio import plot_mels

        d, sr, hop = self.cfg.diffusion, self.info.mel["sample_rate"], self.info.mel["hop_length"]
        mels = x[:, 0].cpu() * d.mel_std + d.mel_mean  # (n, n_mels, frames) log-mels
        names = titles or [f"sample {i}" for i in range(len(mels))]
        when = f" (step {step})" if step is not None else ""
        paths = [plot_mels(prefix + "_mel.png", [(f"{t[:60]!r}{when}", m) for t, m in zip(names, mels)], sr, hop)]
        if "vocoder" in modules:
            voc = unwrap(modules["vocoder"])
            dev = next(voc.parameters()).device
            for i, mel in enumerate(mels):
                wave, _ = voc(mel[None].to(dev))
                paths.append(f"{prefix}{i}.wav")
                sf.write(paths[-1], wave[0].float().clamp(-1, 1).cpu().numpy(), sr)
        return paths
