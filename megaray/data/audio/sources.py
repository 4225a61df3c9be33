"""Audio sources -> clip records ``{path, name, text, speaker[, speaker_vector]}``.

* a folder, searched recursively for ``.wav``/``.flac``/``.ogg``; a sidecar ``name.txt`` or
  ``name.lab`` gives the text; the first sub-folder under the root names the speaker (files at
  the root get speaker ``default``);
* a manifest ``.jsonl`` (one ``{"path", "text"?, "speaker"?, "speaker_vector"?}`` object a line)
  or ``.csv`` (header with at least ``path``); relative paths are relative to the manifest;
* a single audio file;
* a LibriSpeech-layout folder (any ``*.trans.txt`` under it): transcripts from the
  ``.trans.txt`` files, the utterance id as the name (:mod:`megaray.data.audio.librispeech`);
* ``hf:NAME[:CONFIG][@SPLIT]`` / ``hf:./PATH[@SPLIT]``: a Hugging Face dataset
  (:mod:`megaray.data.hf`), a row a clip (:func:`hf_records`): the record also carries ``data``,
  the clip's file bytes, which the preprocessor decodes instead of reading ``path``.

Locations are local paths or URIs (:mod:`megaray.fs`). A record's ``name`` is its clip id (the
path relative to the folder, or as written in the manifest): the split hashes it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import pyarrow.fs as pafs

from megaray import fs
from megaray.data.audio.librispeech import is_librispeech, read_librispeech
from megaray.data.hf import HFColumns, HFTable, Say, audio_bytes, cell_name, cell_text, choose_columns, is_hf
from megaray.data.rejects import Rejects
from megaray.data.sources import read_manifest_rows
from megaray.errors import DataError

AUDIO_EXTS = (".wav", ".flac", ".ogg")
TEXT_SIDECARS = (".txt", ".lab")


def _list_folder(root: str) -> List[Dict[str, Any]]:
    filesystem, base = fs.resolve(root)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
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
                text = fs.read_text(prefix + stem + side).strip()
                break
        records.append(
            {"path": prefix + p, "name": rel, "text": text, "speaker": parts[0] if len(parts) > 1 else "default"}
        )
    return records


def _manifest_records(uri: str) -> List[Dict[str, Any]]:
    """Records of a ``.jsonl`` / ``.csv`` manifest (``path``, ``text``, ``speaker``, ``speaker_vector``)."""
    rows = read_manifest_rows(uri)
    base = fs.dirname(uri)
    records = []
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise DataError(f"{uri}: row {n} has no 'path'")
        rec = {
            "path": fs.join(base, str(row["path"])),
            "name": str(row["path"]),
            "text": str(row.get("text") or ""),
            "speaker": str(row.get("speaker") or "default"),
        }
        vec = row.get("speaker_vector")
        if vec not in (None, ""):
            rec["speaker_vector"] = [float(v) for v in (json.loads(vec) if isinstance(vec, str) else vec)]
        records.append(rec)
    return records


def hf_records(source: str, columns: Optional[HFColumns] = None, say: Say = None) -> List[Dict[str, Any]]:
    """Clip records of an ``hf:`` source: ``{path, name, text, speaker, data}``, ``name`` the row id
    ``hf:IDENT/SPLIT/ROW``, ``data`` the clip's file bytes (:func:`megaray.data.hf.audio_bytes`:
    stored bytes, or a decoded array written as a float32 WAV), ``path`` the row id again (never
    opened) or, for a cell holding only a file path, that file. A null cell gives ``data=b""``,
    which the preprocessor rejects as ``empty_file``. Columns: ``columns`` or detection.

    Raises:
        DataError: as :class:`megaray.data.hf.HFTable` and :func:`megaray.data.hf.choose_columns`.
    """
    table = HFTable(source)
    cols = choose_columns(table, "audio", columns, say)
    speakers = table.class_names(cols["speaker"]) if cols["speaker"] else None
    records = []
    for row, v in table.rows([c for c in cols.values() if c]):
        name = f"{table.prefix}/{row}"
        data, path = audio_bytes(v[cols["audio"]])
        speaker = cell_name(v[cols["speaker"]], speakers) if cols["speaker"] else ""
        records.append(
            {
                "path": path or name,
                "name": name,
                "data": data,
                "speaker": speaker or "default",
                "text": cell_text(v[cols["transcript"]]) if cols["transcript"] else "",
            }
        )
    return records


def collect_sources(
    sources: Union[str, Sequence[str]],
    rejects: Optional[Rejects] = None,
    *,
    columns: Optional[HFColumns] = None,
    say: Say = None,
) -> List[Dict[str, Any]]:
    """Expand folders / manifests / single files into records ``{path, name, text, speaker[, speaker_vector]}``
    (``hf:`` sources: :func:`hf_records`, columns from ``columns`` or detected, the choice said
    through ``say``; their records add ``data``).

    ``rejects`` counts what a source layout skips while listing (a LibriSpeech file without a
    transcript line, a line without a file); None logs them as a warning.

    Raises:
        DataError: a source does not exist (named); a manifest row without ``path`` or with bad
            JSON (file and line named).
    """

    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    records: List[Dict[str, Any]] = []
    for src in map(str, sources):
        if is_hf(src):
            records += hf_records(src, columns, say)
            continue
        filesystem, path = fs.resolve(src)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"audio source not found: {src}")
        if info.type == pafs.FileType.Directory:
            records += read_librispeech(src, rejects) if is_librispeech(src) else _list_folder(src)
        elif src.lower().endswith((".jsonl", ".csv")):
            records += _manifest_records(src)
        else:
            records.append({"path": src, "name": os.path.basename(path), "text": "", "speaker": "default"})
    return records
