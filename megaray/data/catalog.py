"""The sources each ``megaray prepare`` command reads, in one table (``megaray prepare --list``).

A row is ``(spelling, what it gives)``; the readers themselves live in :mod:`megaray.data.sources`
(files, folders, globs, URIs), :mod:`megaray.data.text.documents`, :mod:`megaray.data.audio.sources`
(with :mod:`~megaray.data.audio.librispeech`), :mod:`megaray.data.image.sources`,
:mod:`megaray.data.hf`, :mod:`megaray.data.text.nanogpt` and :mod:`megaray.data.sft`. Keep this
table in step with them (``tests/test_hf_sources.py`` checks every command is listed).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

_URI = ("s3://... gs://... file://...", "any file, folder or glob above in an object store (credentials: environment)")
_HF = ("hf:NAME[:CONFIG][@SPLIT]", "a Hugging Face Hub dataset, streamed (needs network and megaray[hf])")
_HF_LOCAL = ("hf:./PATH[@SPLIT]", "a dataset built locally: a save_to_disk folder, a folder / glob / file of .parquet")

#: command -> [(spelling, what it gives)], in the order ``--list`` prints them.
SOURCES: Dict[str, List[Tuple[str, str]]] = {
    "text": [
        ("stdlib", "docstrings of the running Python's standard library (embedded corpus; the default)"),
        ("FILE.txt  FILE.md", "the whole file is one document"),
        ("FILE.jsonl", "a document per line: field 'text' (optional string 'id')"),
        ("FILE.parquet", "a document per row: string column 'text'"),
        ("FOLDER  GLOB", "every file above under it, recursively ('corpus/**/*.md'); hidden files skipped"),
        _URI,
        _HF,
        _HF_LOCAL,
        ("", "  a row is a document: --text-column, else detected"),
    ],
    "bin": [
        ("FOLDER", "nanoGPT's train.bin / val.bin (flat uint16/uint32 token ids) with --tokenizer"),
    ],
    "sft": [
        ("FILE.jsonl  FOLDER  GLOB  URI", "{prompt, completion} or {messages: [{role, content}]} records"),
    ],
    "audio": [
        ("espeak", "render the embedded espeak-ng speech corpus first (real sentences, several voices; the default)"),
        ("FOLDER", ".wav .flac .ogg below it; sidecar NAME.txt / NAME.lab = transcript; first sub-folder = speaker"),
        ("LIBRISPEECH FOLDER", "detected by its *.trans.txt: transcripts from them, speaker folders, utterance ids"),
        ("FILE.jsonl  FILE.csv", "a manifest: path (relative to it), text, speaker, speaker_vector"),
        ("FILE.wav|flac|ogg", "one clip"),
        ("s3://... gs://... file://...", "any file or folder above in an object store (no globs for audio)"),
        _HF,
        _HF_LOCAL,
        ("", "  a row is a clip: --audio-column, --text-column (transcript), --speaker-column, else detected"),
    ],
    "images": [
        ("skimage", "scikit-image's bundled photographs, random crops of them, lfw_subset faces (the default)"),
        ("FOLDER", "jpg/png/webp/... below it; label = first sub-folder, sidecar .txt = caption, .json = both"),
        ("FILE.tar", "WebDataset shard: members grouped by key; .cls/.json label, .txt/.caption caption"),
        ("FILE.parquet", "image bytes column (image/img/jpg/png/bytes), label/class, caption/text"),
        ("FILE.jsonl  FILE.csv", "a manifest: path or file_name, label, caption"),
        ("FILE.jpg|png|webp|...", "one image"),
        _URI,
        _HF,
        _HF_LOCAL,
        ("", "  a row is an image: --image-column, --caption-column, --label-column, else detected"),
    ],
    "audio-latents": [("--shards FOLDER", "shards of `megaray prepare audio` (default: the VAE run's data.shards)")],
    "image-latents": [("--source FOLDER", "shards of `megaray prepare images`, encoded with --vae-checkpoint")],
}


def format_sources() -> str:
    """The table as ``megaray prepare --list`` prints it: a block per command."""
    lines = ["Sources each prepare command reads: megaray prepare COMMAND --source SOURCE (repeat --source to combine)"]
    width = max(len(s) for rows in SOURCES.values() for s, _ in rows)
    for command, rows in SOURCES.items():
        lines += ["", f"prepare {command}"]
        lines += [f"  {spelling:<{width}}  {what}" for spelling, what in rows]
    return "\n".join(lines)
