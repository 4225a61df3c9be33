"""Audio data: raw clips -> parquet shards (:func:`prepare_audio`) -> fixed-shape Ray datasets
(:func:`audio_datasets`). See ``docs/audio.md``.

Modules: :mod:`.decode` (per-clip decode, resample, normalise, log-mel), :mod:`.sources`
(folders and manifests -> clip records), :mod:`.prepare` (the prepare stages), :mod:`.datasets`
(reproducible crops for training, examples). Encoding clips to VAE latents lives in
:mod:`megaray.inference.latents` (it builds a model; data does not).
"""

from megaray.data.audio.datasets import audio_datasets, crop_start, load_examples, read_manifest, split_files
from megaray.data.audio.decode import (
    MEL_LOG_FLOOR,
    AudioPrepSettings,
    RejectedClip,
    decode_audio,
    loudness_normalize,
    mel_features,
    peak_normalize,
    process_clip,
    resample_mono,
)
from megaray.data.audio.prepare import AudioPreprocessor, prepare_audio, summary
from megaray.data.audio.sources import AUDIO_EXTS, TEXT_SIDECARS, collect_sources
from megaray.fs import read_bytes

__all__ = [
    "AUDIO_EXTS",
    "MEL_LOG_FLOOR",
    "TEXT_SIDECARS",
    "AudioPrepSettings",
    "AudioPreprocessor",
    "RejectedClip",
    "audio_datasets",
    "collect_sources",
    "crop_start",
    "decode_audio",
    "load_examples",
    "loudness_normalize",
    "mel_features",
    "peak_normalize",
    "prepare_audio",
    "process_clip",
    "read_bytes",
    "read_manifest",
    "resample_mono",
    "split_files",
    "summary",
]
