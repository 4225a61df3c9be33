"""The LibriSpeech folder layout through the real ``prepare_audio``: espeak-ng speech (the session
corpus) converted to FLAC as ``ROOT/<speaker>/<chapter>/<spk>-<ch>-<utt>.flac`` with one
``<spk>-<ch>.trans.txt`` per chapter, plus one orphan transcript line and one FLAC without a line."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pytest
import soundfile as sf

from megaray.data.audio import collect_sources, prepare_audio
from megaray.data.audio.librispeech import is_librispeech, read_librispeech
from megaray.data.rejects import Rejects

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

PREP = dict(sample_rate=16000, n_mels=80, n_fft=512, hop_length=128)  # as the other audio tests
LAYOUT = {("19", "198"): 2, ("19", "227"): 2, ("26", "495"): 2, ("26", "496"): 2}  # (speaker, chapter): utterances


@pytest.fixture(scope="module")
def libri(speech_corpus, tmp_path_factory):
    """A LibriSpeech-layout folder of FLACs from the session's espeak-ng wavs: 8 paired utterances,
    ``26/496/26-496-0002.flac`` without a transcript line, and a line ``19-198-0007`` without a file."""
    with open(speech_corpus) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    root = tmp_path_factory.mktemp("librispeech") / "dev-clean"
    expected, k = {}, 0
    for (spk, ch), n in LAYOUT.items():
        folder = root / spk / ch
        folder.mkdir(parents=True)
        lines = []
        for u in range(n + (1 if (spk, ch) == ("26", "496") else 0)):
            utt = f"{spk}-{ch}-{u:04d}"
            wave, sr = sf.read(os.path.join(os.path.dirname(speech_corpus), rows[k]["path"]))
            sf.write(folder / f"{utt}.flac", wave, sr, format="FLAC")
            text = rows[k]["text"].rstrip(".!?").replace(",", "").replace(";", "").upper()  # LibriSpeech style
            if u < n:
                lines.append(f"{utt} {text}")
                expected[utt] = (text, spk)
            k += 1
        if (spk, ch) == ("19", "198"):
            lines.append("19-198-0007 A LINE WHOSE FLAC IS MISSING")
        (folder / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    (root / "README.TXT").write_text("not audio, not a transcript: ignored")
    return {"root": root, "expected": expected, "plain": os.path.dirname(speech_corpus)}


def test_librispeech_records_pair_flacs_with_transcripts_and_name_the_unpaired(libri):
    root = str(libri["root"])
    assert is_librispeech(root) and not is_librispeech(libri["plain"])  # the espeak folder: wavs + manifest.jsonl
    rejects = Rejects()
    recs = collect_sources(root, rejects)
    assert {r["name"]: (r["text"], r["speaker"]) for r in recs} == libri["expected"]
    assert all(r["path"].endswith(r["name"] + ".flac") and os.path.isfile(r["path"]) for r in recs)
    by = rejects.to_json()["by_reason"]
    assert set(by) == {"no_transcript", "missing_audio"}
    assert by["no_transcript"]["count"] == 1 and by["missing_audio"]["count"] == 1
    assert by["no_transcript"]["examples"][0].startswith(
        f"{root}/26/496/26-496-0002.flac: no transcript line 26-496-0002"
    )
    assert (
        by["missing_audio"]["examples"][0]
        == f"{root}/19/198/19-198.trans.txt:3: no audio file 19-198-0007.flac beside it"
    )


def test_librispeech_bad_lines_are_counted_and_without_rejects_logged(tmp_path, caplog):
    folder = tmp_path / "LibriSpeech" / "7" / "11"
    folder.mkdir(parents=True)
    sf.write(folder / "7-11-0000.flac", [0.1, -0.1] * 2000, 16000, format="FLAC")
    (folder / "7-11.trans.txt").write_text("7-11-0000 HELLO THERE\n\n8-12-0001 WRONG CHAPTER\n7-11-0002\n")
    rejects = Rejects()
    recs = read_librispeech(str(tmp_path / "LibriSpeech"), rejects)
    assert [(r["name"], r["text"], r["speaker"]) for r in recs] == [("7-11-0000", "HELLO THERE", "7")]
    assert rejects.to_json()["by_reason"]["bad_transcript_line"]["count"] == 2
    assert rejects.by_reason["bad_transcript_line"]["examples"][0].endswith(
        "7-11.trans.txt:3: expected '7-11-<utt> TEXT', got '8-12-0001 WRONG CHAPTER'"
    )
    with caplog.at_level(logging.WARNING, logger="megaray.data.audio.librispeech"):
        assert len(collect_sources(str(tmp_path / "LibriSpeech"))) == 1
    assert "skipped 2 unpaired files/lines" in caplog.text and "bad_transcript_line=2" in caplog.text


def test_prepare_audio_on_a_librispeech_folder_keeps_transcripts_speakers_and_names_rejects(ray_local, libri, tmp_path):
    import pyarrow.parquet as pq

    root, out = str(libri["root"]), str(tmp_path / "shards")
    man = prepare_audio(root, out, val_fraction=0.25, concurrency=1, verbose=False, **PREP)
    assert man["clips"] == 8 and set(man["speakers"]) == {"19", "26"}
    by = man["rejected"]["by_reason"]
    assert {k: v["count"] for k, v in by.items()} == {"missing_audio": 1, "no_transcript": 1}
    assert "26-496-0002.flac" in by["no_transcript"]["examples"][0]
    assert "19-198.trans.txt:3" in by["missing_audio"]["examples"][0]
    assert json.load(open(os.path.join(out, "manifest.json")))["rejected"] == man["rejected"]
    rows = [
        r
        for f in sorted(glob.glob(os.path.join(out, "*", "*.parquet")))
        for r in pq.read_table(f, columns=["name", "text", "speaker", "speaker_id", "n_frames"]).to_pylist()
    ]
    assert {r["name"]: (r["text"], r["speaker"]) for r in rows} == libri["expected"]
    assert all(r["speaker_id"] == man["speakers"][r["speaker"]] and r["n_frames"] > 10 for r in rows)
    assert man["splits"]["val"]["clips"] >= 1
