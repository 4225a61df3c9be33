"""Audio data: raw clips -> parquet shards (``prepare_audio``) -> fixed-shape Ray datasets.

Sources (local paths, ``s3://``, ``gs://``; opened with ``pyarrow.fs.FileSystem.from_uri`` and
decoded with ``soundfile`` from bytes):

* a folder, searched recursively for ``.wav``/``.flac``/``.ogg``; a sidecar ``name.txt`` or
  ``name.lab`` gives the text; the first sub-folder under the root names the speaker (files at
  the root get speaker ``default``);
* a manifest ``.jsonl`` (one ``{"path", "text"?, "speaker"?, "speaker_vector"?}`` object a line)
  or ``.csv`` (header with at least ``path``); relative paths are relative to the manifest.

Shard layout written by :func:`prepare_audio`::

    out_dir/train/*.parquet   out_dir/val/*.parquet   out_dir/manifest.json (written last)

One row per clip: ``waveform`` list<float32> (mono, ``sample_rate`` Hz, normalised), ``mel``
list<float32> holding the ``(n_mels, n_frames)`` log-mel row-major (see
:mod:`megaray.models.audio.features`), ``n_mels``, ``n_frames``, ``text``, ``speaker``,
``speaker_id`` int64, ``duration`` (s), ``path``, ``name`` and, when every source row has one,
``speaker_vector`` list<float32>.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

AUDIO_EXTS = (".wav", ".flac", ".ogg")
TEXT_SIDECARS = (".txt", ".lab")
FORMAT = "megaray-audio-shards/1"
#: = megaray.models.audio.features.LOG_FLOOR, repeated so crop workers need not import torch
MEL_LOG_FLOOR = 1e-5


class RejectedClip(ValueError):
    """A source file that cannot become a training clip; ``str(e)`` is the reason."""


# --------------------------------------------------------------------------- file systems


def _fs(uri: str) -> Tuple[Any, str]:
    """``(pyarrow FileSystem, path)`` for a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    from pyarrow import fs

    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri)


def _join(base: str, rel: str) -> str:
    if "://" in rel or os.path.isabs(rel):
        return rel
    return base.rstrip("/") + "/" + rel if "://" in base else os.path.join(base, rel)


def _dirname(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))


def read_bytes(uri: str) -> bytes:
    """All bytes of a local file or ``s3://`` / ``gs://`` object."""
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


# --------------------------------------------------------------------------- decoding + DSP


def _wav_truncation(data: bytes) -> Optional[str]:
    """Reason string when a RIFF/WAVE ``data`` chunk declares more bytes than the file holds."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    order = "little" if data[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], order)
        if cid == b"data":
            avail = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and avail < size:  # 0 / -1: streamed header, length unknown
                return f"truncated: data chunk declares {size} bytes, file holds {avail}"
            return None
        pos += 8 + size + (size & 1)
    return None


def decode_audio(data: bytes, name: str = "<bytes>") -> Tuple[np.ndarray, int]:
    """Decode wav/flac/ogg bytes with soundfile -> ``(float32 (L, C), sample_rate Hz)``.

    Raises:
        RejectedClip: empty file, undecodable (corrupt, not audio), truncated WAV, zero frames.
    """
    import soundfile as sf

    if not data:
        raise RejectedClip("empty file (0 bytes)")
    trunc = _wav_truncation(data)
    if trunc:
        raise RejectedClip(trunc)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, declared = f.samplerate, f.frames
            wave = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile: "Format not recognised", decode errors
        msg = re.sub(r"^Error opening <[^>]*>:\s*", "", str(e)).strip()
        raise RejectedClip(f"unreadable: {msg[:160]}") from None
    if wave.shape[0] == 0:
        raise RejectedClip("zero-length audio (0 frames)")
    if 0 < declared and wave.shape[0] < declared:
        raise RejectedClip(f"truncated: decoded {wave.shape[0]} of {declared} frames")
    if not np.isfinite(wave).all():
        raise RejectedClip("non-finite samples")
    return wave, sr


def resample_mono(wave: Union[np.ndarray, "torch.Tensor"], sr: int, target_sr: int) -> "torch.Tensor":
    """``(L,)`` or ``(L, C)`` at ``sr`` Hz -> mono float32 ``(L',)`` at ``target_sr`` Hz
    (channel mean, then ``torchaudio.functional.resample``, windowed-sinc)."""
    import torch
    import torchaudio.functional as AF

    x = torch.as_tensor(wave, dtype=torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=1)
    if sr != target_sr:
        x = AF.resample(x, sr, target_sr)
    return x.contiguous()


def peak_normalize(wave: "torch.Tensor", peak: float = 0.95) -> "torch.Tensor":
    """Scale so ``max|x| == peak``; silent input is returned unchanged."""
    m = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (peak / m) if m > 0 else wave


def loudness_normalize(wave: "torch.Tensor", sample_rate: int, target_lufs: float = -23.0, max_peak: float = 0.99) -> "torch.Tensor":
    """Gain to ``target_lufs`` integrated loudness (ITU-R BS.1770-4 via
    ``torchaudio.functional.loudness``); clips under 0.4 s (one gating block) use RMS dBFS instead.
    The gain is limited so the peak stays under ``max_peak`` (no clipping)."""
    import torch
    import torchaudio.functional as AF

    level = float("nan")
    if wave.numel() >= int(0.4 * sample_rate):
        try:
            level = float(AF.loudness(wave[None], sample_rate))
        except Exception:  # pragma: no cover - torchaudio edge cases
            level = float("nan")
    if not math.isfinite(level):
        rms = float(torch.sqrt(torch.mean(wave.double() ** 2)))
        level = 20 * math.log10(max(rms, 1e-12))
    gain = 10 ** ((target_lufs - level) / 20)
    peak = float(wave.abs().max())
    if peak * gain > max_peak:
        gain = max_peak / peak
    return wave * gain


@dataclass
class AudioPrepSettings:
    """What :func:`prepare_audio` does to each clip (also the manifest's record of it).

    Attributes:
        sample_rate: output rate in Hz (inputs are resampled unless ``input_sample_rate`` is set).
        n_mels, n_fft, hop_length, win_length: log-mel analysis (samples; win default n_fft).
        normalize: ``"peak"`` (to ``peak``) or ``"loudness"`` (to ``target_lufs``) or ``"none"``.
        input_sample_rate: if set, files at any other rate are rejected instead of resampled.
        min_seconds, max_seconds: duration bounds after resampling (``max_seconds`` None = none).
        silence_db: clips whose RMS (before normalisation) is below this dBFS are rejected.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 1024
    hop_length: int = 256
    win_length: Optional[int] = None
    normalize: str = "peak"
    peak: float = 0.95
    target_lufs: float = -23.0
    input_sample_rate: Optional[int] = None
    min_seconds: float = 0.1
    max_seconds: Optional[float] = None
    silence_db: float = -60.0


def process_clip(data: bytes, settings: AudioPrepSettings, features: Any, name: str = "<bytes>") -> Dict[str, Any]:
    """Decode -> mono -> resample -> normalise -> log-mel for one file's bytes.

    ``features`` is a :class:`megaray.models.audio.features.MelFeatures` of the settings.
    Returns ``{"waveform": float32 (L,), "mel": float32 (n_mels, L // hop + 1), "duration": s}``.

    Raises:
        RejectedClip: see :func:`decode_audio`, plus wrong input rate, too short/long, silent.
    """
    import torch

    wave, sr = decode_audio(data, name)
    if settings.input_sample_rate and sr != settings.input_sample_rate:
        raise RejectedClip(f"sample rate {sr} Hz, required {settings.input_sample_rate} Hz")
    x = resample_mono(wave, sr, settings.sample_rate)
    duration = x.numel() / settings.sample_rate
    if duration < settings.min_seconds:
        raise RejectedClip(f"too short: {duration:.3f} s < {settings.min_seconds} s")
    if settings.max_seconds is not None and duration > settings.max_seconds:
        raise RejectedClip(f"too long: {duration:.1f} s > {settings.max_seconds} s")
    rms = float(torch.sqrt(torch.mean(x.double() ** 2)))
    if rms <= 0 or 20 * math.log10(rms) < settings.silence_db:
        level = "-inf" if rms <= 0 else f"{20 * math.log10(rms):.1f}"
        raise RejectedClip(f"silent: RMS {level} dBFS < {settings.silence_db} dBFS")
    if settings.normalize == "peak":
        x = peak_normalize(x, settings.peak)
    elif settings.normalize == "loudness":
        x = loudness_normalize(x, settings.sample_rate, settings.target_lufs)
    with torch.no_grad():
        mel = features(x[None])[0]
    return {"waveform": x.numpy().astype(np.float32), "mel": mel.numpy().astype(np.float32), "duration": duration}


def _features(settings: AudioPrepSettings):
    from megaray.models.audio.features import MelFeatures

    return MelFeatures(settings.sample_rate, settings.n_fft, settings.hop_length, settings.n_mels, settings.win_length)


def _shard_schema(with_vector: bool):
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("name", pa.string()), ("ok", pa.bool_()), ("reason", pa.string()),
        ("split", pa.string()), ("text", pa.string()), ("speaker", pa.string()), ("speaker_id", pa.int64()),
        ("duration", pa.float32()), ("sample_rate", pa.int32()), ("n_mels", pa.int32()), ("n_frames", pa.int32()),
        ("waveform", pa.list_(pa.float32())), ("mel", pa.list_(pa.float32())),
    ]
    if with_vector:
        fields.append(("speaker_vector", pa.list_(pa.float32())))
    return pa.schema(fields)


class AudioPreprocessor:
    """Ray Data ``map_batches`` UDF (one per actor): a batch of source records -> pyarrow table of
    processed clips (``ok=False`` rows carry the rejection ``reason`` and empty arrays)."""

    def __init__(self, settings: Dict[str, Any], with_vector: bool = False):
        import torch

        torch.set_num_threads(1)
        self.settings = AudioPrepSettings(**settings)
        self.features = _features(self.settings)
        self.schema = _shard_schema(with_vector)
        self.with_vector = with_vector

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa

        cols: Dict[str, list] = {f.name: [] for f in self.schema}
        for i in range(len(batch["path"])):
            path, name = str(batch["path"][i]), str(batch["name"][i])
            try:
                out = process_clip(read_bytes(path), self.settings, self.features, name)
                ok, reason = True, ""
            except RejectedClip as e:
                out, ok, reason = None, False, str(e)
            except Exception as e:  # an unexpected failure rejects one file, not the job
                out, ok, reason = None, False, f"error: {type(e).__name__}: {e}"[:200]
            cols["path"].append(path)
            cols["name"].append(name)
            cols["ok"].append(ok)
            cols["reason"].append(reason)
            cols["split"].append(str(batch["split"][i]))
            cols["text"].append(str(batch["text"][i]))
            cols["speaker"].append(str(batch["speaker"][i]))
            cols["speaker_id"].append(int(batch["speaker_id"][i]))
            cols["duration"].append(out["duration"] if ok else 0.0)
            cols["sample_rate"].append(self.settings.sample_rate)
            cols["n_mels"].append(self.settings.n_mels)
            cols["n_frames"].append(out["mel"].shape[1] if ok else 0)
            cols["waveform"].append(out["waveform"] if ok else np.zeros(0, np.float32))
            cols["mel"].append(out["mel"].reshape(-1) if ok else np.zeros(0, np.float32))
            if self.with_vector:
                cols["speaker_vector"].append(np.asarray(batch["speaker_vector"][i], np.float32))
        arrays = [_float_lists(cols[f.name]) if pa.types.is_list(f.type) else pa.array(cols[f.name], type=f.type)
                  for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _float_lists(rows: Sequence[np.ndarray]):
    """``list<float32>`` array from 1-D arrays in one copy (offsets + concatenated values)."""
    import pyarrow as pa

    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(r, np.float32).ravel() for r in rows]) if rows else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


# --------------------------------------------------------------------------- sources


def _list_folder(root: str) -> List[Dict[str, Any]]:
    from pyarrow import fs as pafs

    fs, base = _fs(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    present = set(files)
    prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
    records = []
    for p in files:
        stem, ext = os.path.splitext(p)
        if ext.lower() not in AUDIO_EXTS:
            continue
        rel = os.path.relpath(p, base)
        parts = rel.split(os.sep)
        text = ""
        for side in TEXT_SIDECARS:
            if stem + side in present:
                text = _read_text(prefix + stem + side).strip()
                break
        records.append({"path": prefix + p, "name": rel, "text": text, "speaker": parts[0] if len(parts) > 1 else "default"})
    return records


def _read_manifest_rows(uri: str) -> List[Dict[str, Any]]:
    text = _read_text(uri)
    if uri.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{uri}:{n}: not valid JSON ({e})") from None
    base = _dirname(uri)
    records = []
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ValueError(f"{uri}: row {n} has no 'path'")
        rec = {
            "path": _join(base, str(row["path"])),
            "name": str(row["path"]),
            "text": str(row.get("text") or ""),
            "speaker": str(row.get("speaker") or "default"),
        }
        vec = row.get("speaker_vector")
        if vec not in (None, ""):
            rec["speaker_vector"] = [float(v) for v in (json.loads(vec) if isinstance(vec, str) else vec)]
        records.append(rec)
    return records


def collect_sources(sources: Union[str, Sequence[str]]) -> List[Dict[str, Any]]:
    """Expand folders / manifests / single files into records ``{path, name, text, speaker[, speaker_vector]}``.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: a manifest row without ``path`` or with bad JSON.
    """
    from pyarrow import fs as pafs

    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    records: List[Dict[str, Any]] = []
    for src in map(str, sources):
        fs, path = _fs(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"audio source not found: {src}")
        if info.type == pafs.FileType.Directory:
            records += _list_folder(src)
        elif src.lower().endswith((".jsonl", ".csv")):
            records += _read_manifest_rows(src)
        else:
            records.append({"path": src, "name": os.path.basename(path), "text": "", "speaker": "default"})
    return records


# --------------------------------------------------------------------------- prepare


@contextmanager
def _atomic_dir(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a temp dir beside ``out_dir``; on success rename it into place (local) or write in
    place (object stores, where the manifest written last marks completion)."""
    if "://" in out_dir:
        fs, path = _fs(out_dir)
        from pyarrow import fs as pafs

        if fs.get_file_info(path + "/manifest.json").type != pafs.FileType.NotFound and not overwrite:
            raise FileExistsError(f"{out_dir} already holds shards; pass overwrite=True")
        yield out_dir
        return
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not overwrite and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _filter_table(split: Optional[str], ok: bool, drop: Sequence[str], remap: Optional[Sequence[int]] = None):
    """pyarrow UDF: keep rows with ``ok`` (and ``split``), drop columns, renumber ``speaker_id``
    through ``remap`` (old id -> new id)."""

    def fn(t):
        import pyarrow as pa
        import pyarrow.compute as pc

        mask = pc.equal(t["ok"], ok)
        if split is not None:
            mask = pc.and_(mask, pc.equal(t["split"], split))
        t = t.filter(mask).drop_columns([c for c in drop if c in t.column_names])
        if remap is not None and t.num_rows:
            ids = np.asarray(remap, np.int64)[t["speaker_id"].to_numpy()]
            t = t.set_column(t.schema.get_field_index("speaker_id"), "speaker_id", pa.array(ids, pa.int64()))
        return t

    return fn


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
) -> Dict[str, Any]:
    """Decode, resample, normalise and mel-analyse audio clips into train/val parquet shards.

    The per-clip work runs in Ray Data ``map_batches`` on a pool of ``concurrency`` CPU actors
    (:class:`AudioPreprocessor`). Files that are empty, corrupt, truncated, not audio, at the
    wrong rate (only when ``input_sample_rate`` is set), shorter than ``min_seconds``, longer
    than ``max_seconds`` or silent (RMS below ``silence_db`` dBFS) are skipped and listed by
    name and reason. Output is atomic for local ``out_dir`` (temp dir renamed into place,
    ``manifest.json`` written last); for ``s3://``/``gs://`` the manifest written last marks
    completion.

    Args:
        sources: folder(s), ``.jsonl``/``.csv`` manifest(s) or files; local, ``s3://``, ``gs://``.
        out_dir: destination folder.
        sample_rate: output rate in Hz. n_mels, n_fft, hop_length, win_length: log-mel analysis
            (lengths in samples).
        normalize: ``"peak"`` (0.95 full scale), ``"loudness"`` (``target_lufs`` LUFS) or ``"none"``.
        val_fraction: share of source files (at least one when there are two or more) held out
            for validation, chosen with ``seed``.
        concurrency: preprocessing actors (1 CPU each).

    Returns:
        The manifest dict (also in ``out_dir/manifest.json``): ``clips``, ``hours``, per-split
        counts, ``speakers`` (name -> id), analysis settings, ``rejected`` (``name``, ``path``,
        ``reason``) and ``out_dir``.

    Raises:
        ValueError: bad settings, or no usable clip at all (the message lists the rejects).
        FileExistsError: ``out_dir`` is non-empty and ``overwrite`` is False.
        FileNotFoundError: a source does not exist.
    """
    import ray

    if normalize not in ("peak", "loudness", "none"):
        raise ValueError(f"normalize must be 'peak', 'loudness' or 'none', got {normalize!r}")
    if hop_length <= 0 or n_fft <= 0 or n_mels <= 0 or sample_rate <= 0:
        raise ValueError("sample_rate, n_fft, hop_length and n_mels must be positive")
    settings = AudioPrepSettings(
        sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
        normalize=normalize, target_lufs=target_lufs, input_sample_rate=input_sample_rate,
        min_seconds=min_seconds, max_seconds=max_seconds, silence_db=silence_db,
    )
    if "://" not in out_dir and os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out_dir)} exists and is not empty; pass overwrite=True to replace it")
    t0 = time.time()
    records = collect_sources(sources)
    if not records:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTS)}) found in {sources}")
    with_vector = any("speaker_vector" in r for r in records)
    if with_vector:
        missing = [r["name"] for r in records if "speaker_vector" not in r]
        if missing:
            raise ValueError(f"speaker_vector given for some rows but not for {missing[:5]}")
    speakers = {s: i for i, s in enumerate(sorted({r["speaker"] for r in records}))}
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(records))) if len(records) >= 2 and val_fraction > 0 else 0
    val_idx = set(order[:n_val])
    for i, r in enumerate(records):
        r["split"] = "val" if i in val_idx else "train"
        r["speaker_id"] = speakers[r["speaker"]]
    if verbose:
        print(f"[prepare_audio] {len(records)} files, {len(speakers)} speakers -> {out_dir} "
              f"({sample_rate} Hz, {n_mels} mels, hop {hop_length}, normalize={normalize}, {concurrency} actors)")

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
    meta = processed.map_batches(lambda t: t.drop_columns([c for c in heavy if c in t.column_names]),
                                 batch_format="pyarrow").to_pandas()
    good = meta[meta["ok"]]
    if good.empty:
        raise ValueError(f"no usable clips in {sources}; rejected: "
                         + "; ".join(f"{n}: {r}" for n, r in zip(meta["name"], meta["reason"])))
    # keep at least one validation clip when there are two or more good clips
    if (good["split"] == "val").sum() == 0 and len(good) >= 2:
        moved = good.index[0]
        meta.loc[moved, "split"] = "val"
        move_path = meta.loc[moved, "path"]
        processed = processed.map_batches(_move_to_val(move_path), batch_format="pyarrow")
        good = meta[meta["ok"]]

    # speakers of kept clips only, renumbered 0..n-1 (rejected files do not claim an id)
    kept = sorted(set(good["speaker"]))
    remap = [-1] * len(speakers)
    for new_id, name in enumerate(kept):
        remap[speakers[name]] = new_id
    speakers = {name: i for i, name in enumerate(kept)}
    drop = ["ok", "reason", "split"]
    with _atomic_dir(out_dir, overwrite) as tmp:
        for split in ("train", "val"):
            target = _join(tmp, split)
            if (good["split"] == split).any():
                processed.map_batches(_filter_table(split, True, drop, remap), batch_format="pyarrow").write_parquet(target)
            elif "://" not in target:
                os.makedirs(target, exist_ok=True)
        rejected = meta[~meta["ok"]]
        manifest = {
            "format": FORMAT,
            "kind": "audio",
            "sources": [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: v for k, v in asdict(settings).items()},
            "win_length": settings.win_length or n_fft,
            "mel": "log(clamp(mel_magnitude, 1e-5)); magnitude (power 1) mel of centred Hann frames, HTK scale, no norm",
            "clips": int(len(good)),
            "hours": float(good["duration"].sum() / 3600),
            "splits": {
                s: {"dir": s, "clips": int((good["split"] == s).sum()),
                    "hours": float(good.loc[good["split"] == s, "duration"].sum() / 3600)}
                for s in ("train", "val")
            },
            "speakers": speakers,
            "speaker_vector_dim": int(len(records[0]["speaker_vector"])) if with_vector else None,
            "num_rejected": int(len(rejected)),
            "rejected": [{"name": n, "path": p, "reason": r}
                         for n, p, r in zip(rejected["name"], rejected["path"], rejected["reason"])],
            "seconds": round(time.time() - t0, 2),
        }
        _write_text(_join(tmp, "manifest.json"), json.dumps(manifest, indent=2))
    manifest["out_dir"] = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    if verbose:
        print(summary(manifest))
    return manifest


def _move_to_val(path: str):
    def fn(t):
        import pyarrow as pa
        import pyarrow.compute as pc

        split = pc.if_else(pc.equal(t["path"], path), pa.scalar("val"), t["split"])
        return t.set_column(t.schema.get_field_index("split"), "split", split)

    return fn


def summary(manifest: Dict[str, Any]) -> str:
    """Human summary of a manifest: kept clips and hours per split, rejects by reason."""
    s = manifest["splits"]
    lines = [
        f"[prepare_audio] kept {manifest['clips']} clips ({manifest['hours'] * 60:.2f} min): "
        f"train {s['train']['clips']}, val {s['val']['clips']}; {len(manifest['speakers'])} speakers; "
        f"rejected {manifest['num_rejected']}; {manifest.get('seconds', 0):.1f} s"
    ]
    for r in manifest["rejected"][:20]:
        lines.append(f"  rejected {r['name']}: {r['reason']}")
    if manifest["num_rejected"] > 20:
        lines.append(f"  ... and {manifest['num_rejected'] - 20} more (see manifest.json)")
    return "\n".join(lines)


def read_manifest(shards: str) -> Dict[str, Any]:
    """The ``manifest.json`` of a shard folder (local, ``s3://``, ``gs://``).

    Raises:
        FileNotFoundError: no manifest (not prepared, or preparation did not finish).
    """
    try:
        return json.loads(_read_text(_join(shards, "manifest.json")))
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{shards}: no manifest.json (run prepare_audio first): {e}") from None


# --------------------------------------------------------------------------- training datasets

_CROP_PASSES: Dict[int, int] = {}


def _crop_batch(batch: Dict[str, np.ndarray], *, segment: int, hop: int, n_mels: int, seed: int,
                train: bool, with_vector: bool, val_offset: float = 0.5) -> Dict[str, np.ndarray]:
    """Rows of whole clips -> fixed-shape crops. Train: random hop-aligned start, drawn from an
    RNG seeded by ``(seed, first path of the batch, pass number in this process)``; val: the
    crop starting ``val_offset`` of the way through the clip (0.5 = centre). Short clips are
    zero-padded (mel padded with the log floor)."""
    frames = segment // hop + 1
    rng = None
    if train:
        key = zlib.crc32(str(batch["path"][0]).encode()) if len(batch["path"]) else 0
        n = _CROP_PASSES[key] = _CROP_PASSES.get(key, -1) + 1
        rng = np.random.default_rng([seed, key, n])
    audio = np.zeros((len(batch["path"]), segment), np.float32)
    mel = np.full((len(batch["path"]), n_mels, frames), math.log(MEL_LOG_FLOOR), np.float32)
    for i in range(len(batch["path"])):
        wave = np.asarray(batch["waveform"][i], np.float32)
        m = np.asarray(batch["mel"][i], np.float32).reshape(n_mels, int(batch["n_frames"][i]))
        slots = (len(wave) - segment) // hop  # number of hop-aligned starts minus one
        if slots <= 0:
            start = 0
        elif train:
            start = int(rng.integers(0, slots + 1)) * hop
        else:
            start = int(val_offset * slots) * hop
        piece = wave[start:start + segment]
        audio[i, :len(piece)] = piece
        mpiece = m[:, start // hop:start // hop + frames]
        mel[i, :, :mpiece.shape[1]] = mpiece
    out = {"audio": audio, "mel": mel, "speaker_id": np.asarray(batch["speaker_id"], np.int64)}
    if with_vector:
        out["speaker_vector"] = np.stack([np.asarray(v, np.float32) for v in batch["speaker_vector"]])
    return out


def audio_datasets(
    shards: str,
    segment_samples: int,
    seed: int = 0,
    *,
    val_segment_samples: Optional[int] = None,
    batch_size: int = 16,
    expect: Optional[Dict[str, Any]] = None,
    val_repeats: int = 1,
) -> Dict[str, Any]:
    """Ray datasets of fixed-shape crops from :func:`prepare_audio` shards.

    Columns (ready for ``iter_torch_batches``): ``audio`` float32 ``(segment_samples,)``, ``mel``
    float32 ``(n_mels, segment_samples // hop_length + 1)`` (frame ``j`` centred on sample
    ``j * hop_length`` of the crop), ``speaker_id`` int64 and, when the shards have it,
    ``speaker_vector`` float32 ``(D,)``. Train crops are random (hop-aligned) and change every
    pass; val crops are the fixed centre crop of each clip.

    Args:
        shards: folder written by :func:`prepare_audio` (local, ``s3://``, ``gs://``).
        segment_samples: crop length in samples; a multiple of the shards' ``hop_length``.
        seed: crop RNG seed. val_segment_samples: val crop length (default ``segment_samples``).
        batch_size: rows per ``map_batches`` call (not the training batch size).
        expect: analysis settings the model needs (``sample_rate``, ``n_mels``, ``n_fft``,
            ``hop_length``); a mismatch with the manifest raises.
        val_repeats: take this many fixed crops per val clip (at offsets ``(r + 0.5) / k``), to
            give small validation sets enough rows for every rank.

    Raises:
        FileNotFoundError: no manifest. ValueError: segment not a multiple of hop_length, or an
            ``expect`` mismatch (the message names both values).
    """
    import ray

    man = read_manifest(shards)
    for k, v in (expect or {}).items():
        if k in man and man[k] != v:
            raise ValueError(f"shards {shards} were prepared with {k}={man[k]} but the model needs {k}={v}; "
                             f"re-run prepare_audio with {k}={v} or change the model config")
    hop, n_mels = int(man["hop_length"]), int(man["n_mels"])
    val_seg = val_segment_samples or segment_samples
    for s in (segment_samples, val_seg):
        if s % hop:
            raise ValueError(f"segment_samples ({s}) must be a multiple of hop_length ({hop})")
    with_vector = bool(man.get("speaker_vector_dim"))
    cols = ["path", "waveform", "mel", "n_frames", "speaker_id"] + (["speaker_vector"] if with_vector else [])
    out = {}
    kw = dict(hop=hop, n_mels=n_mels, seed=seed, with_vector=with_vector)
    train = ray.data.read_parquet(_join(shards, man["splits"]["train"]["dir"]), columns=cols)
    out["train"] = train.randomize_block_order(seed=seed).map_batches(
        _crop_batch, batch_size=batch_size, batch_format="numpy", fn_kwargs=dict(kw, segment=segment_samples, train=True),
    )
    val = ray.data.read_parquet(_join(shards, man["splits"]["val"]["dir"]), columns=cols)
    k = max(1, int(val_repeats))
    parts = [
        val.map_batches(_crop_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs=dict(kw, segment=val_seg, train=False, val_offset=(r + 0.5) / k))
        for r in range(k)
    ]
    out["val"] = parts[0].union(*parts[1:]) if k > 1 else parts[0]
    return out


def load_examples(shards: str, split: str = "val", n: int = 2) -> List[Dict[str, Any]]:
    """The first ``n`` whole clips of a split, read with pyarrow (no Ray): dicts with
    ``waveform`` (L,), ``mel`` (n_mels, F), ``text``, ``speaker``, ``speaker_id``, ``name``."""
    import pyarrow.dataset as pads

    man = read_manifest(shards)
    fs, path = _fs(_join(shards, man["splits"][split]["dir"]))
    table = pads.dataset(path, filesystem=fs, format="parquet").head(n)
    rows = []
    for r in table.to_pylist():
        rows.append({
            "waveform": np.asarray(r["waveform"], np.float32),
            "mel": np.asarray(r["mel"], np.float32).reshape(r["n_mels"], r["n_frames"]),
            "text": r["text"], "speaker": r["speaker"], "speaker_id": r["speaker_id"], "name": r["name"],
            **({"speaker_vector": np.asarray(r["speaker_vector"], np.float32)} if r.get("speaker_vector") else {}),
        })
    return rows


# --------------------------------------------------------------------------- latents


def _rebuild_vae(config: Dict[str, Any], state: Dict[str, Any]):
    from megaray.models.audio.config import AudioVAEConfig
    from megaray.models.audio.vae import AudioVAE

    model = AudioVAE(AudioVAEConfig.model_validate(config))
    model.load_state_dict(state)
    return model


def _with_split(split: str):
    def fn(t):
        import pyarrow as pa

        return t.append_column("split", pa.array([split] * t.num_rows, pa.string()))

    return fn


def _filter_split(split: str):
    def fn(t):
        import pyarrow.compute as pc

        return t.filter(pc.equal(t["split"], split)).drop_columns(["split"])

    return fn


class LatentEncoder:
    """Ray Data UDF holding a VAE on its actor: whole-clip log-mels -> latent means."""

    def __init__(self, factory: Callable[[], Any], device: str = "cpu"):
        import torch

        torch.set_num_threads(1)
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = factory().to(self.device).eval()

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        latents, shapes = [], []
        with torch.no_grad():
            for i in range(len(batch["path"])):
                mel = np.asarray(batch["mel"][i], np.float32).reshape(int(batch["n_mels"][i]), int(batch["n_frames"][i]))
                mu, _ = self.model.encode(torch.from_numpy(mel)[None, None].to(self.device))
                z = mu[0].float().cpu().numpy()
                latents.append(z.reshape(-1))
                shapes.append(list(z.shape))
        return pa.table({
            "split": pa.array([str(p) for p in batch["split"]]),
            "path": pa.array([str(p) for p in batch["path"]]),
            "name": pa.array([str(p) for p in batch["name"]]),
            "text": pa.array([str(p) for p in batch["text"]]),
            "speaker": pa.array([str(p) for p in batch["speaker"]]),
            "speaker_id": pa.array(np.asarray(batch["speaker_id"], np.int64)),
            "duration": pa.array(np.asarray(batch["duration"], np.float32)),
            "latent": pa.array(latents, type=pa.list_(pa.float32())),
            "latent_shape": pa.array(shapes, type=pa.list_(pa.int32())),
        })


def encode_latents(
    shards: str,
    out_dir: str,
    vae: Any,
    *,
    concurrency: int = 1,
    batch_size: int = 8,
    num_gpus: float = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Encode every clip of :func:`prepare_audio` shards into VAE latents (``megaray prepare
    audio-latents --vae-checkpoint PATH``).

    Runs Ray Data ``map_batches`` over a pool of ``concurrency`` actors, each holding the model
    (:class:`LatentEncoder`). Each output row holds ``latent`` (the posterior mean, flattened
    row-major) with ``latent_shape`` ``[latent_channels, n_mels/down_freq, ceil(F/down_time)]``,
    plus ``text``, ``speaker``, ``speaker_id``, ``duration``, ``path``, ``name``.

    Args:
        shards: audio shards whose ``n_mels`` matches the VAE.
        out_dir: destination (train/, val/, manifest.json written last; atomic when local).
        vae: an :class:`~megaray.models.audio.vae.AudioVAE` (its config and CPU weights are
            shipped to the actors) or a zero-argument callable returning one.
        num_gpus: GPUs per actor (0 = CPU).

    Returns:
        Manifest dict: ``clips`` per split, latent settings, ``vae_config``, ``out_dir``.

    Raises:
        ValueError: VAE ``n_mels`` differs from the shards'. FileExistsError: see prepare_audio.
    """
    import functools

    import ray

    man = read_manifest(shards)
    if callable(vae) and not hasattr(vae, "state_dict"):
        factory, cfg = vae, None
    else:
        net = getattr(vae, "module", vae)
        cfg = net.cfg.model_dump(mode="json")
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        factory = functools.partial(_rebuild_vae, cfg, state)
    if cfg is not None and cfg["n_mels"] != man["n_mels"]:
        raise ValueError(f"VAE expects n_mels={cfg['n_mels']} but shards {shards} have n_mels={man['n_mels']}")
    counts = {s: int(man["splits"][s]["clips"]) for s in ("train", "val")}
    cols = ["path", "name", "text", "speaker", "speaker_id", "duration", "mel", "n_mels", "n_frames"]
    parts = [
        ray.data.read_parquet(_join(shards, man["splits"][s]["dir"]), columns=cols).map_batches(
            _with_split(s), batch_format="pyarrow")
        for s in ("train", "val") if counts[s]
    ]
    with _atomic_dir(out_dir, overwrite) as tmp:
        # one pass over both splits, so the actor pool (and its model copies) starts once
        enc = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).map_batches(
            LatentEncoder, fn_constructor_kwargs={"factory": factory, "device": "cuda" if num_gpus else "cpu"},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus,
            num_cpus=1, batch_format="numpy",
        ).materialize()
        for split in ("train", "val"):
            if counts[split]:
                enc.map_batches(_filter_split(split), batch_format="pyarrow").write_parquet(_join(tmp, split))
            elif "://" not in tmp:
                os.makedirs(_join(tmp, split), exist_ok=True)
        manifest = {
            "format": "megaray-audio-latents/1", "kind": "audio_latents", "source_shards": shards,
            "sample_rate": man["sample_rate"], "n_mels": man["n_mels"], "hop_length": man["hop_length"],
            "speakers": man["speakers"], "vae_config": cfg,
            "splits": {s: {"dir": s, "clips": int(c)} for s, c in counts.items()},
            "clips": int(sum(counts.values())),
        }
        _write_text(_join(tmp, "manifest.json"), json.dumps(manifest, indent=2))
    manifest["out_dir"] = out_dir if "://" in out_dir else os.path.abspath(out_dir)
    if verbose:
        print(f"[encode_latents] {manifest['clips']} clips -> {manifest['out_dir']}")
    return manifest
