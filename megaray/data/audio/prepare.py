"""``prepare_audio``: raw clips -> train/val parquet shards + manifest, in stages.

    sources -> _records: clip records (DataError naming a missing source, before any Ray work),
               split by a hash of each clip id (megaray.data.splits), speaker ids
      -> _process: Ray Data map_batches over an actor pool (AudioPreprocessor: decode, resample,
               normalise, log-mel); rejects counted by reason (megaray.data.rejects)
      -> _fill_val: one clip moved to val when hashing left it empty
      -> _write: parquet per split into a staging folder, manifest (kind "audio") last, published
               atomically (megaray.fs.staged_dir)

Shard layout::

    out_dir/train/*.parquet   out_dir/val/*.parquet   out_dir/manifest.json (written last)

One row per clip: ``waveform`` list<float32> (mono, ``sample_rate`` Hz, normalised), ``mel``
list<float32> holding the ``(n_mels, n_frames)`` log-mel row-major (see
:mod:`megaray.models.common.dsp`), ``n_mels``, ``n_frames``, ``text``, ``speaker``,
``speaker_id`` int64, ``duration`` (s), ``path``, ``name`` and, when every source row has one,
``speaker_vector`` list<float32>.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from megaray import fs
from megaray.data.audio.decode import AudioPrepSettings, RejectedClip, mel_features, process_clip
from megaray.data.audio.sources import AUDIO_EXTS, collect_sources
from megaray.data.hf import HFColumns, is_hf
from megaray.data.manifest import new_manifest, write_manifest
from megaray.data.rejects import Rejects, summary_lines
from megaray.data.splits import closest_to_boundary, split_of
from megaray.errors import DataError

MEL_DESCRIPTION = "log(clamp(mel_magnitude, 1e-5)); magnitude (power 1) mel of centred Hann frames, HTK scale, no norm"


def _shard_schema(with_vector: bool):
    import pyarrow as pa

    fields = [
        ("path", pa.string()),
        ("name", pa.string()),
        ("ok", pa.bool_()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("speaker", pa.string()),
        ("speaker_id", pa.int64()),
        ("duration", pa.float32()),
        ("sample_rate", pa.int32()),
        ("n_mels", pa.int32()),
        ("n_frames", pa.int32()),
        ("waveform", pa.list_(pa.float32())),
        ("mel", pa.list_(pa.float32())),
    ]
    if with_vector:
        fields.append(("speaker_vector", pa.list_(pa.float32())))
    return pa.schema(fields)


class AudioPreprocessor:
    """Ray Data ``map_batches`` UDF (one per actor): a batch of source records -> pyarrow table of
    processed clips (``ok=False`` rows carry the reject ``code``, ``reason`` and empty arrays)."""

    def __init__(self, settings: Dict[str, Any], with_vector: bool = False):
        import torch

        torch.set_num_threads(1)
        self.settings = AudioPrepSettings(**settings)
        self.features = mel_features(self.settings)
        self.schema = _shard_schema(with_vector)
        self.with_vector = with_vector

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa

        cols: Dict[str, list] = {f.name: [] for f in self.schema}
        for i in range(len(batch["path"])):
            path, name = str(batch["path"][i]), str(batch["name"][i])
            data = batch["data"][i] if "data" in batch else b""  # inline bytes of hf: rows (path = row id)
            out, ok, code, reason = None, False, "", ""
            try:
                raw = bytes(data) if len(data) or is_hf(path) else fs.read_bytes(path)
                out, ok = process_clip(raw, self.settings, self.features, name), True
            except RejectedClip as e:
                code, reason = e.code, str(e)
            except Exception as e:  # an unexpected failure rejects one file, not the job
                code, reason = "error", f"{type(e).__name__}: {e}"[:200]
            row = {
                "path": path,
                "name": name,
                "ok": ok,
                "code": code,
                "reason": reason,
                "split": str(batch["split"][i]),
                "text": str(batch["text"][i]),
                "speaker": str(batch["speaker"][i]),
                "speaker_id": int(batch["speaker_id"][i]),
                "duration": out["duration"] if ok else 0.0,
                "sample_rate": self.settings.sample_rate,
                "n_mels": self.settings.n_mels,
                "n_frames": out["mel"].shape[1] if ok else 0,
                "waveform": out["waveform"] if ok else np.zeros(0, np.float32),
                "mel": out["mel"].reshape(-1) if ok else np.zeros(0, np.float32),
            }
            if self.with_vector:
                row["speaker_vector"] = np.asarray(batch["speaker_vector"][i], np.float32)
            for k, v in row.items():
                cols[k].append(v)
        arrays = [
            _float_lists(cols[f.name]) if pa.types.is_list(f.type) else pa.array(cols[f.name], type=f.type)
            for f in self.schema
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _float_lists(rows: Sequence[np.ndarray]):
    """``list<float32>`` array from 1-D arrays in one copy (offsets + concatenated values)."""
    import pyarrow as pa

    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(r, np.float32).ravel() for r in rows]) if rows else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


def _select(split: str, drop: Sequence[str], remap: Sequence[int]):
    """pyarrow UDF: rows of kept clips in ``split``, ``drop`` columns removed,
    ``speaker_id`` renumbered through ``remap`` (old id -> new id)."""

    def fn(t):
        import pyarrow as pa
        import pyarrow.compute as pc

        mask = pc.and_(pc.equal(t["ok"], True), pc.equal(t["split"], split))
        t = t.filter(mask).drop_columns([c for c in drop if c in t.column_names])
        if t.num_rows:
            ids = np.asarray(remap, np.int64)[t["speaker_id"].to_numpy()]
            t = t.set_column(t.schema.get_field_index("speaker_id"), "speaker_id", pa.array(ids, pa.int64()))
        return t

    return fn


def _records(
    sources: Sequence[str],
    val_fraction: float,
    seed: int,
    rejects: Rejects,
    columns: Optional[HFColumns] = None,
    say: Any = None,
) -> List[Dict[str, Any]]:
    """Stage 1: clip records with ``split`` (hash of the clip name) and ``speaker_id``; what the
    source layout skips (a LibriSpeech file without a transcript line, ...) counted in ``rejects``."""
    records = collect_sources(sources, rejects, columns=columns, say=say)
    if not records:
        skipped = f"; skipped: {rejects.describe()}" if rejects.total else ""
        raise DataError(f"no audio files ({', '.join(AUDIO_EXTS)}) found in {', '.join(sources)}{skipped}")
    if any("speaker_vector" in r for r in records):
        missing = [r["name"] for r in records if "speaker_vector" not in r]
        if missing:
            raise DataError(f"speaker_vector given for some rows but not for {missing[:5]}")
    if any("data" in r for r in records):  # hf: rows carry their bytes; every row needs the column
        for r in records:
            r.setdefault("data", b"")
    speakers = {s: i for i, s in enumerate(sorted({r["speaker"] for r in records}))}
    for r in records:
        r["split"] = split_of(r["name"], val_fraction, seed) if val_fraction > 0 else "train"
        r["speaker_id"] = speakers[r["speaker"]]
    return records


def _process(records: List[Dict[str, Any]], settings: AudioPrepSettings, concurrency: int, batch_size: int):
    """Stage 2: every clip through :class:`AudioPreprocessor` (materialized) + its metadata table."""
    import ray

    with_vector = "speaker_vector" in records[0]
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 4 * concurrency)))
    processed = ds.map_batches(
        AudioPreprocessor,
        fn_constructor_kwargs={"settings": asdict(settings), "with_vector": with_vector},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
        batch_format="numpy",
    ).materialize()
    heavy = ["waveform", "mel", "speaker_vector"]
    meta = processed.map_batches(
        lambda t: t.drop_columns([c for c in heavy if c in t.column_names]), batch_format="pyarrow"
    ).to_pandas()
    return processed, meta


def _fill_val(good, val_fraction: float, seed: int) -> None:
    """Stage 3: with two or more kept clips and ``val_fraction > 0``, make sure val is not empty
    by moving the train clip whose hash is closest to the boundary (``good`` updated in place)."""
    if val_fraction > 0 and len(good) >= 2 and not (good["split"] == "val").any():
        name = closest_to_boundary(good["name"], "val", seed)
        good.loc[good["name"] == name, "split"] = "val"


def _check_args(normalize: str, positive: Sequence[int], val_fraction: float) -> None:
    if normalize not in ("peak", "loudness", "none"):
        raise DataError(f"normalize must be 'peak', 'loudness' or 'none', got {normalize!r}")
    if min(positive) <= 0:
        raise DataError("sample_rate, n_fft, hop_length, n_mels, concurrency and batch_size must be positive")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def prepare_audio(
    sources: Union[str, Sequence[str]],
    out_dir: str,
    sample_rate: int = 16000,
    n_mels: int = 80,
    n_fft: int = 1024,
    hop_length: int = 256,
    normalize: str = "peak",
    *,
    win_length: Optional[int] = None,
    target_lufs: float = -23.0,
    input_sample_rate: Optional[int] = None,
    min_seconds: float = 0.1,
    max_seconds: Optional[float] = None,
    silence_db: float = -60.0,
    val_fraction: float = 0.05,
    seed: int = 0,
    concurrency: int = 2,
    batch_size: int = 8,
    overwrite: bool = False,
    verbose: bool = True,
    columns: Optional[HFColumns] = None,
) -> Dict[str, Any]:
    """Decode, resample, normalise and mel-analyse audio clips into train/val parquet shards.

    The per-clip work runs in Ray Data ``map_batches`` on a pool of ``concurrency`` CPU actors.
    Files that are empty, corrupt, truncated, not audio, at the wrong rate (only when
    ``input_sample_rate`` is set), shorter than ``min_seconds``, longer than ``max_seconds`` or
    silent (RMS below ``silence_db`` dBFS) are skipped and counted by reason with their names
    (manifest ``rejected``, the summary). Output is published atomically (:mod:`megaray.fs`).

    Args:
        sources: folder(s) (a LibriSpeech layout is detected by its ``*.trans.txt``:
            :mod:`megaray.data.audio.librispeech`), ``.jsonl``/``.csv`` manifest(s) or files;
            local, ``s3://``, ``gs://``; or ``hf:`` Hugging Face datasets (:mod:`megaray.data.hf`).
        out_dir: destination folder; must be empty or absent unless ``overwrite``.
        sample_rate: output rate in Hz. n_mels, n_fft, hop_length, win_length: log-mel analysis
            (lengths in samples).
        normalize: ``"peak"`` (0.95 full scale), ``"loudness"`` (``target_lufs`` LUFS) or ``"none"``.
        val_fraction: expected share of clips in val, by a hash of each clip's name
            (:func:`megaray.data.splits.split_of` with ``seed``); at least one val clip when two
            or more clips are kept and ``val_fraction > 0``.
        concurrency: preprocessing actors (1 CPU each).
        overwrite: replace an existing ``out_dir``.
        columns: audio / transcript (``text``) / speaker columns of ``hf:`` sources (None or a
            None field: detect; :mod:`megaray.data.hf`).

    Returns:
        The manifest dict (also ``out_dir/manifest.json``, kind ``audio``) plus ``out_dir``.

    Raises:
        DataError: bad settings; a missing source (named, before any Ray work); ``out_dir`` not
            empty without ``overwrite``; no usable clip at all (the rejects are listed).
    """
    _check_args(normalize, (hop_length, n_fft, n_mels, sample_rate, concurrency, batch_size), val_fraction)
    sources = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
    settings = AudioPrepSettings(
        sample_rate=sample_rate,
        n_mels=n_mels,
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=win_length,
        normalize=normalize,
        target_lufs=target_lufs,
        input_sample_rate=input_sample_rate,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        silence_db=silence_db,
    )
    t0 = time.time()
    fs.check_target(out_dir, overwrite)
    rejects = Rejects(max_examples=20)
    records = _records(sources, val_fraction, seed, rejects, columns, print if verbose else None)
    if verbose:
        print(
            f"[prepare_audio] {len(records)} files -> {out_dir} ({sample_rate} Hz, {n_mels} mels, "
            f"hop {hop_length}, normalize={normalize}, {concurrency} actors)"
        )
    with _ordered_execution():
        processed, meta = _process(records, settings, concurrency, batch_size)
    for name, code, reason in zip(
        meta.loc[~meta["ok"], "name"], meta.loc[~meta["ok"], "code"], meta.loc[~meta["ok"], "reason"]
    ):
        rejects.add(code, name, detail=reason)
    good = meta[meta["ok"]].copy()
    if good.empty:
        raise DataError(f"no usable clips in {', '.join(sources)}; rejected: {rejects.describe()}")
    _fill_val(good, val_fraction, seed)
    extra = {
        "all_speakers": sorted({r["speaker"] for r in records}),
        "vector_dim": len(records[0]["speaker_vector"]) if "speaker_vector" in records[0] else None,
    }
    with _ordered_execution():
        manifest = _write(processed, good, rejects, sources, settings, out_dir, overwrite, **extra)
    manifest["seconds"] = round(time.time() - t0, 2)
    manifest["out_dir"] = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    if verbose:
        print(summary(manifest))
    return manifest


@contextlib.contextmanager
def _ordered_execution():
    """Ray Data keeps row order while this is open (``preserve_order``): the actor pool finishes
    batches in whatever order the load allows, and without it the shards' row order (so a
    training run's batch order) would differ from one ``prepare`` to the next."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def _write(
    processed,
    good,
    rejects: Rejects,
    sources: List[str],
    settings: AudioPrepSettings,
    out_dir: str,
    overwrite: bool,
    all_speakers: List[str],
    vector_dim: Optional[int],
) -> Dict[str, Any]:
    """Stage 4: per-split parquet (kept clips; speakers of kept clips renumbered 0..n-1, so
    rejected files claim no id) and the manifest, published atomically."""
    kept = sorted(set(good["speaker"]))
    remap = [kept.index(s) if s in kept else -1 for s in all_speakers]
    speakers = {name: i for i, name in enumerate(kept)}
    split_of_name = dict(zip(good["name"], good["split"]))
    processed = processed.map_batches(_resplit(split_of_name), batch_format="pyarrow")
    with fs.staged_dir(out_dir, overwrite) as stage:
        for split in ("train", "val"):
            target = fs.join(stage, split)
            if split in split_of_name.values():
                processed.map_batches(
                    _select(split, ["ok", "code", "reason", "split"], remap), batch_format="pyarrow"
                ).write_parquet(target)
            elif not fs.is_uri(target):
                os.makedirs(target, exist_ok=True)
        manifest = new_manifest(
            "audio",
            sources=sources,
            **{**asdict(settings), "win_length": settings.win_length or settings.n_fft},
            mel=MEL_DESCRIPTION,
            clips=int(len(good)),
            hours=float(good["duration"].sum() / 3600),
            splits={
                s: {
                    "dir": s,
                    "clips": int((good["split"] == s).sum()),
                    "hours": float(good.loc[good["split"] == s, "duration"].sum() / 3600),
                }
                for s in ("train", "val")
            },
            speakers=speakers,
            speaker_vector_dim=vector_dim,
            rejected=rejects.to_json(),
        )
        write_manifest(stage, manifest)
    return manifest


def _resplit(split_of_name: Dict[str, str]):
    """pyarrow UDF: set ``split`` from ``split_of_name`` (after :func:`_fill_val` moved a clip)."""

    def fn(t):
        import pyarrow as pa

        split = [split_of_name.get(n, s) for n, s in zip(t["name"].to_pylist(), t["split"].to_pylist())]
        return t.set_column(t.schema.get_field_index("split"), "split", pa.array(split, pa.string()))

    return fn


def summary(manifest: Dict[str, Any]) -> str:
    """Human summary of an audio manifest: kept clips and hours per split, rejects by reason."""
    s = manifest["splits"]
    head = (
        f"[prepare_audio] kept {manifest['clips']} clips ({manifest['hours'] * 60:.2f} min): "
        f"train {s['train']['clips']}, val {s['val']['clips']}; {len(manifest['speakers'])} speakers; "
        f"{manifest.get('seconds', 0):.1f} s"
    )
    return "\n".join([head] + summary_lines(manifest["rejected"]))
