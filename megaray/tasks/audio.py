"""The audio families' shared task base: shard checks, the batch plan, the positioned crop stream,
example clips, mel plots.

:class:`AudioTask` is subclassed by :class:`megaray.tasks.vocoder.VocoderTask` and
:class:`megaray.tasks.audio_vae.AudioVAETask`. Both read shards written by
:func:`megaray.data.audio.prepare_audio`; batches are ``{"audio": (B, S) float32, "mel":
(B, n_mels, S // hop + 1) float32, "speaker_id": (B,) int64}`` (plus ``speaker_vector`` ``(B, D)``
when the shards carry one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megaray.config import ConfigError
from megaray.data import order
from megaray.tasks.base import Task, TaskInfo


@dataclass
class AudioInfo(TaskInfo):
    """:class:`TaskInfo` of an audio run.

    Attributes:
        train_clips / val_clips: clips per split.
        val_repeats: fixed crops per validation clip (tiny val sets get several).
        crop_passes: random crops of every training clip in one epoch of the train dataset.
        speakers: ``{speaker name: id}`` from the manifest.
    """

    train_clips: int = 0
    val_clips: int = 0
    val_repeats: int = 1
    crop_passes: int = 1
    speakers: Dict[str, int] = field(default_factory=dict)


class AudioTask(Task):
    """Shared data plumbing: shard/config consistency checks, the batch plan (:meth:`Task.batch_plan`:
    world-independent) and the positioned train stream (:func:`crop_stream`)."""

    unit = "samples"
    info_class = AudioInfo
    #: validation clips rendered by :meth:`eval_artifacts`
    n_artifacts: int = 2
    #: longest clip (seconds) rendered by :meth:`eval_artifacts`
    artifact_seconds: float = 8.0

    def _expect(self) -> Dict[str, Any]:
        m = self.cfg.model
        return {"sample_rate": m.sample_rate, "n_mels": m.n_mels, "n_fft": m.n_fft, "hop_length": m.hop_length}

    def datasets(self) -> Dict[str, Any]:
        from megaray.data import audio

        sources = self.cfg.data.resolved_sources()
        if len(sources) > 1:
            raise ConfigError(
                "data.sources: the audio families train on one shard set; give data.shards "
                "(or one entry in data.sources)"
            )
        shards = sources[0].shards
        man = audio.read_manifest(shards)  # DataError naming the folder and the prepare command
        for key, want in self._expect().items():
            if man.get(key) != want:
                raise ConfigError(
                    f"model.{key}: the model needs {key}={want} but {shards} was prepared with {key}={man.get(key)}; "
                    f"set model.{key}={man.get(key)} or re-prepare the audio"
                )
        self._check_manifest(man)
        t, B, world = self.cfg.train, self.cfg.data.batch_size, self.cfg.scaling.max_workers
        n_train, n_val = man["splits"]["train"]["clips"], man["splits"]["val"]["clips"]
        if n_val < 1:
            raise ConfigError(f"data: {shards} has no validation clips; prepare with val_fraction > 0")
        passes = self.crop_passes(n_train, order.global_batch_size(t.global_batch_size, B, t.grad_accum_steps, world))
        repeats = max(1, math.ceil(world * B / n_val))  # extra fixed crops per val clip for tiny val sets
        self.info = AudioInfo(
            **self.batch_plan(
                passes * n_train,
                n_val * repeats,
                shards,
                f"crops ({n_train} training clips x {passes} crop passes)",
                "prepare more audio or lower data.batch_size",
            ),
            manifest=man,
            train_clips=n_train,
            val_clips=n_val,
            val_repeats=repeats,
            crop_passes=passes,
            speakers=man.get("speakers", {}),
        )
        return audio.audio_datasets(
            shards,
            self.cfg.model.segment_samples,
            seed=t.seed,
            expect=self._expect(),
            val_repeats=repeats,
            crop_passes=passes,
            on_corrupt=self.cfg.data.on_corrupt,
        )

    #: most crop passes in one epoch of the train dataset
    max_crop_passes: int = 16

    def crop_passes(self, n_train: int, global_batch: int) -> int:
        """How many differently cropped passes over the ``n_train`` training clips one epoch holds:
        as many as the run needs (``ceil(max_steps x global_batch / n_train)``), at most
        :attr:`max_crop_passes`; the same at every world size. Crops are a function of (seed,
        clip, pass) (see :mod:`megaray.data.audio.datasets`), so a run sees new crops of each
        clip on every pass and a resumed run sees exactly the crops an uninterrupted one would."""
        need = math.ceil(self.cfg.train.max_steps * global_batch / max(1, n_train))
        return max(1, min(self.max_crop_passes, need))

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """Random crops of the training clips (:attr:`AudioInfo.crop_passes` passes an epoch) in the
        world-independent served order of :mod:`megaray.data.rows`, from sample ``cursor`` of
        ``epoch`` on (crops seeded by (seed, clip, pass), as :func:`megaray.data.audio.audio_datasets`)."""
        return crop_stream(
            self.cfg,
            self.info.manifest,
            plan,
            epoch,
            cursor,
            segment=self.cfg.model.segment_samples,
            passes=self.info.crop_passes,
        )

    def prepare_command(self, shards: str) -> Optional[str]:
        m = self.cfg.model
        return (
            f"megaray prepare audio --source espeak --out {shards} --sample-rate {m.sample_rate} "
            f"--n-mels {m.n_mels} --n-fft {m.n_fft} --hop-length {m.hop_length}"
        )

    def _check_manifest(self, man: Dict[str, Any]) -> None:
        """Family-specific checks of the shard manifest (raise ConfigError)."""

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["audio"].numel()) if "audio" in batch else int(next(iter(batch.values())).shape[0])

    def _examples(self) -> List[Dict[str, Any]]:
        if not hasattr(self, "_example_cache"):
            from megaray.data.audio import load_examples

            self._example_cache = load_examples(self.cfg.data.resolved_sources()[0].shards, "val", self.n_artifacts)
        return self._example_cache

    def _crop_example(self, ex: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        hop = self.cfg.model.hop_length
        frames = int(self.artifact_seconds * self.cfg.model.sample_rate) // hop
        mel = torch.from_numpy(ex["mel"][:, : frames + 1])
        wave = torch.from_numpy(ex["waveform"][: frames * hop])
        return wave, mel


def crop_stream(
    cfg: Any,
    man: Dict[str, Any],
    plan: Any,
    epoch: int,
    cursor: int,
    *,
    segment: int,
    passes: int = 1,
    from_start: bool = False,
    text_max_len: Optional[int] = None,
) -> Any:
    """The positioned train stream of an audio shard set (``cfg.data``'s one source, manifest
    ``man``): clips in the served order of :func:`megaray.data.rows.positioned_rows` (``passes``
    reads an epoch), cropped by :func:`megaray.data.audio.datasets._crop_batch` (train crops seeded
    by (seed, clip, pass); ``from_start``: from the first sample; ``text_max_len``: transcripts as
    byte ids), with ``epoch`` and ``index``, in blocks of ``plan.micro_batch`` rows."""
    from megaray.data import rows
    from megaray.data.audio.datasets import _crop_batch

    shards, seed = cfg.data.resolved_sources()[0].shards, cfg.train.seed
    with_vector = bool(man.get("speaker_vector_dim"))
    cols = (
        ["name", "waveform", "mel", "n_frames", "speaker_id"]
        + (["speaker_vector"] if with_vector else [])
        + (["text"] if text_max_len else [])
    )
    ds = rows.split_rows(cfg, shards, man, cols, plan=plan, epoch=epoch, cursor=cursor, passes=passes)
    kw = dict(
        segment=segment,
        hop=int(man["hop_length"]),
        n_mels=int(man["n_mels"]),
        seed=seed,
        train=True,
        with_vector=with_vector,
        from_start=from_start,
        text_max_len=text_max_len,
    )
    return rows.map_positioned(ds, _crop_batch, plan.micro_batch, fn_kwargs=kw)


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
        im = ax.imshow(
            mel,
            origin="lower",
            aspect="auto",
            interpolation="none",
            vmin=vmin,
            vmax=vmax,
            extent=[0, seconds, 0, mel.shape[0]],
        )
        ax.set_title(title)
        ax.set_ylabel("mel band")
        fig.colorbar(im, ax=ax, label="log magnitude")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
