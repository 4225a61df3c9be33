"""Audio shards -> fixed-shape crops through Ray Data, reproducible for exact resume.

Every random choice is a function of (seed, clip id, pass), with no process state:

* the train split is read row group by row group (:mod:`megaray.data.shards`, corrupt row
  groups named or skipped) ``crop_passes`` times; pass ``p`` adds a column ``pass = p`` to its
  rows (a counter carried in the data, pass-major order);
* the crop of a row starts at hop-aligned slot ``rng.integers(0, slots + 1)`` of
  ``np.random.default_rng([seed, crc32(clip name), pass])``.

Why a pass column and not process state: a per-process counter (the old ``_CROP_PASSES``)
restarts at zero after a worker restart, so a resumed run cropped differently from an
uninterrupted one. With the pass column, the crops of every execution are identical, so re-reading
a block after a crash gives the same crops as the first time. Training reads the positioned
stream (:mod:`megaray.data.rows`: the epoch's order permuted inside shuffle blocks by
``(seed, epoch, block)``, the same at any world size); this module's datasets serve validation
and evaluation. An epoch covers ``crop_passes`` different crops of every clip; the audio tasks
(:meth:`megaray.tasks.audio.AudioTask.crop_passes`) set it to the passes the run needs (at most
16), so a run sees new crops of each clip on every pass.

Val crops are fixed: pass ``r`` of ``val_repeats`` crops ``(r + 0.5) / val_repeats`` of the way
through each clip. Passes are read items, not a ``union`` of datasets (see
:func:`megaray.data.shards.read_dataset`), so the row order is the same on every execution.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megaray import fs
from megaray.data import shards as shard_io
from megaray.data.audio.decode import MEL_LOG_FLOOR
from megaray.data.manifest import prepare_hint, read_manifest as _read
from megaray.errors import DataError


def read_manifest(shards: str, kind: str = "audio") -> Dict[str, Any]:
    """The checked manifest of an audio shard folder (local, ``s3://``, ``gs://``).

    Raises:
        DataError: missing folder or manifest, other version or kind; says which
            ``megaray prepare`` command makes it.
    """
    return _read(shards, kind)


def split_files(shards: str, man: Dict[str, Any], split: str) -> Tuple[Any, List[str], List[str]]:
    """``(filesystem, paths, display names)`` of a split's parquet files, sorted by name
    (the data core's :func:`megaray.data.shards.split_files`)."""
    from megaray.data.shards import split_files as core_split_files

    return core_split_files(shards, man, split)


def crop_start(seed: int, clip: str, pass_index: int, slots: int, hop: int) -> int:
    """Sample offset of a train crop: hop-aligned, uniform over ``slots + 1`` starts, a pure
    function of ``(seed, clip, pass_index)``."""
    if slots <= 0:
        return 0
    rng = np.random.default_rng([seed, zlib.crc32(clip.encode("utf-8")), pass_index])
    return int(rng.integers(0, slots + 1)) * hop


def text_bytes(texts: List[str], max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Byte-level token ids of transcripts: ``ids (n, max_len) int64`` = UTF-8 byte + 1 (0 = padding;
    a vocabulary of 257) cut to ``max_len``, and ``mask (n, max_len) bool`` (True = a real byte)."""
    ids = np.zeros((len(texts), max_len), np.int64)
    for i, t in enumerate(texts):
        b = np.frombuffer(str(t).encode("utf-8")[:max_len], np.uint8)
        ids[i, : len(b)] = b.astype(np.int64) + 1
    return ids, ids > 0


def _crop_batch(
    batch: Dict[str, np.ndarray],
    *,
    segment: int,
    hop: int,
    n_mels: int,
    seed: int,
    train: bool,
    with_vector: bool,
    val_repeats: int = 1,
    from_start: bool = False,
    text_max_len: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Rows of whole clips -> fixed-shape crops: ``audio`` (n, segment), ``mel`` (n, n_mels,
    segment // hop + 1), ``speaker_id`` (n,) [, ``speaker_vector`` (n, D)]. Train: start from
    :func:`crop_start` (clip id = ``name``, else ``path``; pass from the ``pass`` column, else
    0); val: ``(pass + 0.5) / val_repeats`` of the way through the clip. Short clips are
    zero-padded (mel padded with the log floor)."""
    n = len(batch["n_frames"])
    frames = segment // hop + 1
    ids = batch["name"] if "name" in batch else batch["path"]
    passes = batch["pass"] if "pass" in batch else np.zeros(n, np.int64)
    audio = np.zeros((n, segment), np.float32)
    mel = np.full((n, n_mels, frames), math.log(MEL_LOG_FLOOR), np.float32)
    for i in range(n):
        wave = np.asarray(batch["waveform"][i], np.float32)
        m = np.asarray(batch["mel"][i], np.float32).reshape(n_mels, int(batch["n_frames"][i]))
        slots = (len(wave) - segment) // hop  # number of hop-aligned starts minus one
        if from_start:
            start = 0
        elif train:
            start = crop_start(seed, str(ids[i]), int(passes[i]), slots, hop)
        else:
            start = int((int(passes[i]) + 0.5) / val_repeats * slots) * hop if slots > 0 else 0
        piece = wave[start : start + segment]
        audio[i, : len(piece)] = piece
        mpiece = m[:, start // hop : start // hop + frames]
        mel[i, :, : mpiece.shape[1]] = mpiece
    out = {"audio": audio, "mel": mel, "speaker_id": np.asarray(batch["speaker_id"], np.int64)}
    if with_vector:
        out["speaker_vector"] = np.stack([np.asarray(v, np.float32) for v in batch["speaker_vector"]])
    if text_max_len:
        out["text_ids"], out["text_mask"] = text_bytes(list(batch["text"]), text_max_len)
    return out


def _clips(
    shards: str, man: Dict[str, Any], split: str, cols: List[str], on_corrupt: str, passes: Optional[int] = None
) -> Any:
    """Ray Dataset of one split's whole-clip rows, read by row group (corrupt ones named);
    ``passes=k``: every row ``k`` times, pass-major, with a ``pass`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, paths, displays = split_files(shards, man, split)
    hint = prepare_hint("audio", shards) + " with --overwrite"
    if not paths:
        raise DataError(f"{fs.join(shards, man['splits'][split]['dir'])} holds no parquet files; {hint}")
    items = shard_io.row_groups(filesystem, paths, displays, hint)
    with filesystem.open_input_file(paths[0]) as fh:
        full = pq.ParquetFile(fh).schema_arrow
    schema = pa.schema([full.field(c) for c in cols])
    return shard_io.read_dataset(filesystem, items, cols, schema, on_corrupt, hint, passes=passes)


def audio_datasets(
    shards: str,
    segment_samples: int,
    seed: int = 0,
    *,
    val_segment_samples: Optional[int] = None,
    batch_size: int = 16,
    expect: Optional[Dict[str, Any]] = None,
    val_repeats: int = 1,
    crop_passes: int = 1,
    on_corrupt: str = "error",
    from_start: bool = False,
    text_max_len: Optional[int] = None,
) -> Dict[str, Any]:
    """Ray datasets of fixed-shape crops from :func:`prepare_audio` shards.

    Columns (ready for ``iter_torch_batches``): ``audio`` float32 ``(segment_samples,)``, ``mel``
    float32 ``(n_mels, segment_samples // hop_length + 1)`` (frame ``j`` centred on sample
    ``j * hop_length`` of the crop), ``speaker_id`` int64 and, when the shards have it,
    ``speaker_vector`` float32 ``(D,)``. Train: ``crop_passes * train clips`` rows, crops per
    the module docstring (identical on every execution); val: ``val_repeats * val clips`` rows.

    Args:
        shards: folder written by :func:`prepare_audio` (local, ``s3://``, ``gs://``).
        segment_samples: crop length in samples; a multiple of the shards' ``hop_length``.
        seed: crop seed. val_segment_samples: val crop length (default ``segment_samples``).
        batch_size: rows per ``map_batches`` call (not the training batch size).
        expect: analysis settings the model needs (``sample_rate``, ``n_mels``, ``n_fft``,
            ``hop_length``); a mismatch with the manifest raises.
        val_repeats: fixed crops per val clip (at offsets ``(r + 0.5) / k``).
        crop_passes: random crops per train clip per epoch (pass ``p`` seeds its crops).
        on_corrupt: ``"error"`` or ``"skip"`` for a row group that cannot be decoded.
        from_start: crop every clip (train and val) from its first sample, so the crop holds the
            start of what its transcript says (the mel DiT); padded when shorter.
        text_max_len: also give each row its transcript as ``text_ids`` int64 ``(text_max_len,)``
            and ``text_mask`` bool (:func:`text_bytes`).

    Raises:
        DataError: no manifest; segment not a multiple of hop_length; an ``expect`` mismatch
            (names both values); a missing or corrupt shard (named).
    """
    man = read_manifest(shards)
    for k, v in (expect or {}).items():
        if k in man and man[k] != v:
            raise DataError(
                f"shards {shards} were prepared with {k}={man[k]} but the model needs {k}={v}; "
                f"re-run `megaray prepare audio` with --{k.replace('_', '-')} {v} or change the model config"
            )
    hop, n_mels = int(man["hop_length"]), int(man["n_mels"])
    val_seg = val_segment_samples or segment_samples
    for s in (segment_samples, val_seg):
        if s <= 0 or s % hop:
            raise DataError(f"segment_samples ({s}) must be a positive multiple of hop_length ({hop})")
    if crop_passes < 1 or val_repeats < 1:
        raise DataError(f"crop_passes ({crop_passes}) and val_repeats ({val_repeats}) must be >= 1")
    with_vector = bool(man.get("speaker_vector_dim"))
    cols = (
        ["name", "waveform", "mel", "n_frames", "speaker_id"]
        + (["speaker_vector"] if with_vector else [])
        + (["text"] if text_max_len else [])
    )
    kw = dict(
        hop=hop, n_mels=n_mels, seed=seed, with_vector=with_vector, from_start=from_start, text_max_len=text_max_len
    )
    train = _clips(shards, man, "train", cols, on_corrupt, passes=crop_passes)
    out = {
        "train": train.map_batches(
            _crop_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs=dict(kw, segment=segment_samples, train=True),
        )
    }
    val = _clips(shards, man, "val", cols, on_corrupt, passes=val_repeats)
    out["val"] = val.map_batches(
        _crop_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs=dict(kw, segment=val_seg, train=False, val_repeats=val_repeats),
    )
    return out


def load_examples(shards: str, split: str = "val", n: int = 2) -> List[Dict[str, Any]]:
    """The first ``n`` whole clips of a split, read with pyarrow (no Ray): dicts with
    ``waveform`` (L,), ``mel`` (n_mels, F), ``text``, ``speaker``, ``speaker_id``, ``name``."""
    import pyarrow.dataset as pads

    man = read_manifest(shards)
    filesystem, path = fs.resolve(fs.join(shards, man["splits"][split]["dir"]))
    table = pads.dataset(path, filesystem=filesystem, format="parquet").head(n)
    rows = []
    for r in table.to_pylist():
        rows.append(
            {
                "waveform": np.asarray(r["waveform"], np.float32),
                "mel": np.asarray(r["mel"], np.float32).reshape(r["n_mels"], r["n_frames"]),
                "text": r["text"],
                "speaker": r["speaker"],
                "speaker_id": r["speaker_id"],
                "name": r["name"],
                **({"speaker_vector": np.asarray(r["speaker_vector"], np.float32)} if r.get("speaker_vector") else {}),
            }
        )
    return rows
