"""The embedded default speech corpus: real English sentences, synthetic voices, no download.

Sentences come from the docstrings of the Python standard library (the one walker,
:mod:`megaray.data.stdlib`), filtered to short, clean English prose. Each is rendered by Debian's ``espeak-ng`` with one of several
English voices; every voice is one speaker. The ALSA test sounds
(``/usr/share/sounds/alsa/*.wav``, from ``alsa-utils``) join as speaker ``alsa`` when present.

Output::

    out_dir/wavs/<speaker>_<n>.wav   out_dir/manifest.jsonl ({"path", "text", "speaker"}; written last)

Feed ``out_dir/manifest.jsonl`` to :func:`megaray.data.audio.prepare_audio`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from megaray import fs
from megaray.data.stdlib import iter_docstrings
from megaray.errors import DataError

#: espeak-ng voices used as speakers (``espeak-ng --voices=en`` lists languages; ``+f3`` etc.
#: are the bundled variants). Each is a distinct timbre/accent.
DEFAULT_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-us+f3",
    "en-gb-x-rp+f2",
    "en-029",
    "en-us-nyc+m3",
    "en-gb-x-gbcwmd+f4",
)
ALSA_DIR = "/usr/share/sounds/alsa"

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CLEAN = re.compile(r"^[A-Z][A-Za-z ,;'\-]+[a-z][.!?]$")
#: folders skipped on top of megaray.data.stdlib.SKIP_DIRS (code samples, not prose)
_EXTRA_SKIP_DIRS = ("lib2to3", "turtledemo")


class EspeakMissing(DataError, RuntimeError):
    """espeak-ng is not installed (a DataError: the CLI reports it as ``error: ...``)."""


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissing(
            "espeak-ng not found: the default speech corpus is rendered with it. "
            "Install it with `apt-get install espeak-ng` (Debian/Ubuntu) or point prepare_audio at your own audio."
        )
    return exe


def stdlib_sentences(n: int, min_words: int = 5, max_words: int = 16, per_file: int = 3) -> List[str]:
    """Up to ``n`` distinct clean English sentences from stdlib docstrings, in a fixed order
    (the docstrings come from :func:`megaray.data.stdlib.iter_docstrings`, the one walker).

    A sentence is kept when it has ``min_words``..``max_words`` words, starts with a capital,
    ends with ``.``/``!``/``?`` and holds only letters, spaces and ``,;'-`` (no code, digits,
    URLs or identifiers). At most ``per_file`` come from one file, for variety; ``test_*.py``
    files and the ``lib2to3``/``turtledemo`` folders are skipped.
    """
    seen, out = set(), []
    taken: Dict[str, int] = {}
    for doc in iter_docstrings(min_chars=0, dedupe=False, extra_skip_dirs=_EXTRA_SKIP_DIRS):
        if doc.file.rsplit("/", 1)[-1].startswith("test_") or taken.get(doc.file, 0) >= per_file:
            continue
        for para in doc.text.split("\n\n"):
            for s in _SENTENCE_SPLIT.split(" ".join(para.split())):
                words = s.split()
                if not (min_words <= len(words) <= max_words) or not _CLEAN.match(s) or s in seen:
                    continue
                if any(w.isupper() and len(w) > 1 for w in words) or "  " in s:
                    continue
                seen.add(s)
                out.append(s)
                taken[doc.file] = taken.get(doc.file, 0) + 1
                if len(out) >= n:
                    return out
                if taken[doc.file] >= per_file:
                    break
            if taken.get(doc.file, 0) >= per_file:
                break
    return out


def available_voices(voices: Sequence[str]) -> List[str]:
    """The subset of ``voices`` installed in espeak-ng (``language[+variant]``).

    espeak-ng silently falls back to a default voice for unknown names, so names are checked
    against ``espeak-ng --voices`` (languages, voice names, files) and ``--voices=variant``.
    """
    exe = _espeak()

    def names(*args: str) -> set:
        text = subprocess.run([exe, *args], capture_output=True, text=True).stdout
        out = set()
        for line in text.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5:
                out.update({cols[1].lower(), cols[3].lower(), cols[4].lower(), cols[4].split("/")[-1].lower()})
        return out

    langs, variants = names("--voices"), names("--voices=variant")
    ok = []
    for v in voices:
        base, _, variant = v.lower().partition("+")
        if base in langs and (not variant or variant in variants):
            ok.append(v)
    return ok


def _speaker_name(voice: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", voice).strip("_")


def build_speech_corpus(
    out_dir: str,
    n_clips: int = 300,
    voices: Optional[Sequence[str]] = None,
    include_alsa: bool = True,
    speed: int = 160,
    workers: int = 2,
    overwrite: bool = False,
) -> str:
    """Render ``n_clips`` stdlib sentences with espeak-ng voices (round-robin) into ``out_dir``.

    Args:
        out_dir: destination folder (built in a temp sibling, published atomically by
            :func:`megaray.fs.staged_dir`).
        n_clips: espeak-ng clips (the ALSA sounds come on top when ``include_alsa``).
        voices: espeak-ng voice names, one speaker each (default :data:`DEFAULT_VOICES`,
            filtered to those installed).
        speed: words per minute (``espeak-ng -s``).
        workers: parallel espeak-ng processes.

    Returns:
        Path of ``out_dir/manifest.jsonl`` (rows ``{"path": "wavs/...", "text", "speaker"}``,
        paths relative to the manifest). Espeak clips are 22.05 kHz mono 16-bit wav.

    Raises:
        EspeakMissing: espeak-ng is not installed (``apt-get install espeak-ng``).
        DataError: ``out_dir`` holds a manifest or is not empty and ``overwrite`` is False.
        RuntimeError: espeak-ng failed on a sentence (stderr included), or no voice is usable.
    """
    exe = _espeak()
    out = os.path.abspath(out_dir)
    manifest = os.path.join(out, "manifest.jsonl")
    voices = available_voices(voices or DEFAULT_VOICES)
    if not voices:
        raise RuntimeError("none of the requested espeak-ng voices is installed (see `espeak-ng --voices=en`)")
    sentences = stdlib_sentences(n_clips)
    jobs = [
        (f"wavs/{_speaker_name(voices[i % len(voices)])}_{i:05d}.wav", text, voices[i % len(voices)])
        for i, text in enumerate(sentences)
    ]
    with fs.staged_dir(out, overwrite, marker="manifest.jsonl") as tmp:
        os.makedirs(os.path.join(tmp, "wavs"))

        def render(job):
            rel, text, voice = job
            r = subprocess.run(
                [exe, "-v", voice, "-s", str(speed), "-w", os.path.join(tmp, rel), text], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise RuntimeError(f"espeak-ng -v {voice} failed on {text!r}: {r.stderr.strip()}")

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(render, jobs))
        rows = [{"path": rel, "text": text, "speaker": _speaker_name(voice)} for rel, text, voice in jobs]
        if include_alsa and os.path.isdir(ALSA_DIR):
            for fn in sorted(os.listdir(ALSA_DIR)):
                if fn.lower().endswith(".wav"):
                    shutil.copy(os.path.join(ALSA_DIR, fn), os.path.join(tmp, "wavs", f"alsa_{fn}"))
                    stem = os.path.splitext(fn)[0]
                    text = "" if stem.lower() == "noise" else stem.replace("_", " ")
                    rows.append({"path": f"wavs/alsa_{fn}", "text": text, "speaker": "alsa"})
        fs.write_text(os.path.join(tmp, "manifest.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    return manifest
