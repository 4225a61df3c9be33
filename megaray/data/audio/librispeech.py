"""The LibriSpeech folder layout -> clip records ``{path, name, text, speaker}``.

LibriSpeech (Panayotov et al. 2015, openslr.org/12) ships as::

    ROOT/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt     lines "<speaker>-<chapter>-<utt> TRANSCRIPT"

A folder is read this way when any ``*.trans.txt`` lies under it (:func:`read_librispeech`;
``ROOT`` may also be a folder above the subsets, e.g. ``LibriSpeech/`` holding
``train-clean-100/`` and ``dev-clean/``). Each audio file (``.flac``, or ``.wav``/``.ogg`` in
converted copies) is paired with the transcript line of its utterance id in the ``.trans.txt``
files of its own folder:

* ``name``: the utterance id (``19-198-0001``, unique across the corpus; the split hashes it);
* ``text``: the transcript as written (upper case, no punctuation in LibriSpeech);
* ``speaker``: the speaker folder (two levels above the file; the id's first field when the
  file lies less deep).

Nothing is dropped silently. An audio file without a transcript line is not a clip: it is counted
as reject ``no_transcript``; a transcript line whose audio file is absent is counted as
``missing_audio`` (``file.trans.txt:line``); a line that is not ``<id> <text>`` with an id of
its file's ``<speaker>-<chapter>`` is ``bad_transcript_line``. The counts go to ``rejects``
(:class:`megaray.data.rejects.Rejects`: the manifest's ``rejected``) or, without one, to a
logged warning.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.fs as pafs

from megaray import fs
from megaray.data.rejects import Rejects

log = logging.getLogger(__name__)

TRANSCRIPT_SUFFIX = ".trans.txt"
#: audio extensions paired with transcripts (LibriSpeech itself is FLAC)
AUDIO_EXTS = (".flac", ".wav", ".ogg")


def _listing(root: str) -> Tuple[str, str, List[str]]:
    """``(uri prefix, base path, sorted file paths relative to base with '/')`` of a folder."""
    filesystem, base = fs.resolve(root)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    prefix = root.split("://", 1)[0] + "://" if fs.is_uri(root) else ""
    rel = sorted(os.path.relpath(i.path, base).replace(os.sep, "/") for i in infos if i.type == pafs.FileType.File)
    return prefix, base, rel


def is_librispeech(root: str) -> bool:
    """True when any ``*.trans.txt`` lies under the folder ``root`` (local or URI)."""
    return any(p.endswith(TRANSCRIPT_SUFFIX) for p in _listing(root)[2])


def _parse_transcripts(where: str, text: str, rejects: Rejects) -> Dict[str, Tuple[str, int]]:
    """``{utterance id: (transcript, line number)}`` of one ``<spk>-<ch>.trans.txt`` (``where``:
    its display path). Lines that are not ``<spk>-<ch>-<utt> TEXT`` count as ``bad_transcript_line``."""
    chapter = posixpath.basename(where)[: -len(TRANSCRIPT_SUFFIX)]
    out: Dict[str, Tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        utt, _, transcript = line.strip().partition(" ")
        if not utt.startswith(chapter + "-") or not transcript.strip():
            rejects.add(
                "bad_transcript_line",
                f"{where}:{n}",
                detail=f"expected '{chapter}-<utt> TEXT', got {line.strip()[:60]!r}",
            )
            continue
        out[utt] = (transcript.strip(), n)
    return out


def read_librispeech(root: str, rejects: Optional[Rejects] = None) -> List[Dict[str, Any]]:
    """Clip records of a LibriSpeech-layout folder (module docstring), in path order.

    Args:
        root: the folder (local path or ``s3://``/``gs://`` URI).
        rejects: where unpaired files and lines are counted (``no_transcript``,
            ``missing_audio``, ``bad_transcript_line``; examples name the file, or
            ``file.trans.txt:line``). None: they are logged as one warning.

    Returns:
        ``[{"path", "name" (utterance id), "text" (transcript), "speaker"}, ...]``.

    Raises:
        DataError: a ``.trans.txt`` cannot be read or is not UTF-8 (named).
    """
    own = rejects if rejects is not None else Rejects()
    before = own.total
    prefix, base, files = _listing(root)
    display_root = root.rstrip("/")

    def location(rel: str) -> str:
        return (
            prefix + posixpath.join(base.replace(os.sep, "/"), rel) if prefix else os.path.join(base, *rel.split("/"))
        )

    by_dir: Dict[str, Dict[str, List[str]]] = {}
    for rel in files:
        folder, name = posixpath.split(rel)
        entry = by_dir.setdefault(folder, {"audio": [], "transcripts": []})
        if name.endswith(TRANSCRIPT_SUFFIX):
            entry["transcripts"].append(rel)
        elif os.path.splitext(name)[1].lower() in AUDIO_EXTS:
            entry["audio"].append(rel)
    records: List[Dict[str, Any]] = []
    for _folder, entry in sorted(by_dir.items()):
        lines: Dict[str, Tuple[str, int, str]] = {}
        for rel in entry["transcripts"]:
            where = f"{display_root}/{rel}"
            for utt, (text, n) in _parse_transcripts(where, fs.read_text(location(rel)), own).items():
                lines[utt] = (text, n, where)
        used = set()
        for rel in entry["audio"]:
            utt = os.path.splitext(posixpath.basename(rel))[0]
            if utt not in lines:
                where = (
                    "(no .trans.txt in its folder)"
                    if not entry["transcripts"]
                    else "in " + ", ".join(posixpath.basename(t) for t in entry["transcripts"])
                )
                own.add("no_transcript", f"{display_root}/{rel}", detail=f"no transcript line {utt} {where}")
                continue
            used.add(utt)
            parts = rel.split("/")
            speaker = parts[-3] if len(parts) >= 3 else utt.split("-", 1)[0]
            records.append({"path": location(rel), "name": utt, "text": lines[utt][0], "speaker": speaker})
        for utt, (_, n, where) in sorted(lines.items(), key=lambda kv: (kv[1][2], kv[1][1])):
            if utt not in used:
                own.add("missing_audio", f"{where}:{n}", detail=f"no audio file {utt}.flac beside it")
    if rejects is None and own.total > before:
        log.warning(
            "LibriSpeech folder %s: skipped %d unpaired files/lines: %s", root, own.total - before, own.describe()
        )
    return records
