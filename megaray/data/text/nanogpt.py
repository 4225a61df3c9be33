"""``import_nanogpt_bin``: nanoGPT's ``train.bin`` / ``val.bin`` -> megaray text shards + manifest.

nanoGPT's ``data/*/prepare.py`` writes each split as one flat array of token ids on disk, read
back with ``np.memmap(path, dtype=np.uint16, mode="r")``: ``openwebtext`` appends GPT-2's EOT
(``<|endoftext|>``, 50256) after every document, ``shakespeare_char`` writes one character
stream without separators. The ids are ``uint16``; a vocabulary over 65,536 ids needs ``uint32``
(``dtype="auto"`` picks by the tokenizer's size, as that convention does).

Stages (driver only, one process; each file is read sequentially in chunks of ``chunk_tokens``,
never whole: memory stays at a few chunks whatever the file size)::

    DIR/train.bin, DIR/val.bin
      -> _scan: per file, in chunks: token count, max id, EOT count; any id >= the tokenizer's
         vocabulary size is a DataError naming the file, the max id, its first position and the size
         (before anything is written)
      -> _write_split: rows cut at the tokenizer's EOS (<|endoftext|>; a row ends with it), rows
         longer than ``max_row_tokens`` cut into pieces of that length, the tail after the last
         EOS the last row; ShardWriter (the prepare_text writer: list<int32> ``tokens``, zstd,
         page checksums, row groups of 1024 rows / 1M tokens)
      -> manifest.json (kind "text"; tokenizer.json copied beside it), written last by the atomic
         publish (:func:`megaray.fs.staged_dir`)

Why rows end at EOS. The trainer's packer (:class:`megaray.data.text.datasets.Packer`, and the
positioned stream) concatenates the rows of a split in order and cuts windows of
``block_size + 1``, so the windows are the same for any row split: the concatenation of the rows
is the ``.bin`` stream, token for token, in order. Cutting at EOS additionally keeps a row one
document, as ``megaray prepare text`` writes them: the manifest's ``documents`` / ``eos_tokens``
mean what they mean there, and readers that take one row as one sequence (the multimodal
mixture's text rows: the first ``block_size + 1`` tokens of a row) start at a document start
instead of mid-text. ``max_row_tokens`` bounds a row (a stream without separators, a runaway
document) so a row group stays near its token budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np

from megaray import fs
from megaray.data.manifest import new_manifest, write_manifest
from megaray.data.rejects import summary_lines
from megaray.data.splits import SPLITS
from megaray.data.text.writer import ShardWriter, cross_entropy, entropy
from megaray.data.tokenizer import EOS, eos_id, load_tokenizer, tokenizer_kind
from megaray.errors import DataError

#: ``--dtype`` choices; ``auto``: uint16 when every id of the tokenizer fits, else uint32
DTYPES = ("auto", "uint16", "uint32")
#: the file of each split inside the source folder (nanoGPT's names)
FILES = {"train": "train.bin", "val": "val.bin"}


@dataclass
class _Scan:
    """One ``.bin`` file, read once before writing."""

    path: str
    bytes: int
    tokens: int
    max_id: int
    eos: int


def _chunks(path: str, dtype: np.dtype, chunk_tokens: int) -> Iterator[np.ndarray]:
    """The file's ids in consecutive arrays of at most ``chunk_tokens``, read sequentially (the
    layout ``np.memmap`` reads; not mapped, so pages already read do not stay in the process)."""
    with open(path, "rb") as fh:
        while True:
            chunk = np.fromfile(fh, dtype=dtype, count=chunk_tokens)
            if not len(chunk):
                return
            yield chunk


def _resolve_dtype(dtype: str, vocab: int) -> np.dtype:
    if dtype not in DTYPES:
        raise DataError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    return np.dtype(dtype)


def _scan(path: str, dtype: np.dtype, vocab: int, eos: int, tokenizer: str, chunk_tokens: int) -> _Scan:
    """Size, max id and EOS count of one file; the vocabulary check.

    Raises:
        DataError: missing or empty file; size not a multiple of the dtype's width; an id >= ``vocab``.
    """
    if not os.path.isfile(path):
        raise DataError(f"nanoGPT split file not found: {path} (nanoGPT's prepare.py writes train.bin and val.bin)")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes): re-run nanoGPT's prepare.py")
    if size % dtype.itemsize:
        raise DataError(
            f"{path} is {size:,} bytes, not a whole number of {dtype.name} ids ({dtype.itemsize} bytes "
            f"each): a file of another dtype, or truncated; pass the dtype it was written with (--dtype)"
        )
    max_id, n_eos, first_bad, pos = 0, 0, None, 0
    for chunk in _chunks(path, dtype, chunk_tokens):
        m = int(chunk.max())
        if m >= vocab and first_bad is None:
            first_bad = pos + int(np.argmax(chunk >= vocab))
        max_id = max(max_id, m)
        n_eos += int(np.count_nonzero(chunk == eos))
        pos += len(chunk)
    if first_bad is not None:
        raise DataError(
            f"{path} holds token id {max_id} (max; first out-of-range id at token {first_bad:,}) but the tokenizer "
            f"{tokenizer} has {vocab} tokens (ids 0..{vocab - 1}): the .bin was written with another tokenizer "
            f"(GPT-2's has 50257) or another dtype than {dtype.name}; pass the tokenizer it was encoded with"
        )
    return _Scan(path, size, size // dtype.itemsize, max_id, n_eos)


def row_lengths(doc_lengths: np.ndarray, max_row_tokens: int) -> np.ndarray:
    """Row lengths of documents of ``doc_lengths`` (each >= 1) when a row holds at most
    ``max_row_tokens``: a document splits into full rows of that length, then its remainder."""
    doc_lengths = np.asarray(doc_lengths, np.int64)
    full = (doc_lengths - 1) // max_row_tokens
    out = np.full(int((full + 1).sum()), max_row_tokens, np.int64)
    out[np.cumsum(full + 1) - 1] = doc_lengths - full * max_row_tokens
    return out


def _write_split(
    scan: _Scan, dtype: np.dtype, eos: int, writer: ShardWriter, max_row_tokens: int, chunk_tokens: int
) -> None:
    """Stream one file into ``writer``: rows end at EOS, at most ``max_row_tokens`` long (module docstring)."""
    carry = np.empty(0, np.int32)
    for chunk in _chunks(scan.path, dtype, chunk_tokens):
        stream = np.concatenate([carry, chunk.astype(np.int32)])
        ends = np.flatnonzero(stream == eos) + 1
        done = int(ends[-1]) if len(ends) else 0
        if len(stream) - done >= max_row_tokens:  # an unfinished document already fills whole rows
            done += (len(stream) - done) // max_row_tokens * max_row_tokens
            ends = np.append(ends, done)
        if done:
            writer.add(row_lengths(np.diff(ends, prepend=0), max_row_tokens), stream[:done])
        carry = stream[done:]
    if len(carry):
        writer.add(row_lengths(np.array([len(carry)]), max_row_tokens), carry)
    writer.close()


def import_nanogpt_bin(
    source: str,
    out_dir: str,
    tokenizer: str,
    dtype: str = "auto",
    *,
    max_row_tokens: int = 1 << 16,
    chunk_tokens: int = 1 << 20,
    rows_per_group: int = 1024,
    group_tokens: int = 1 << 20,
    tokens_per_shard: int = 1 << 24,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Turn nanoGPT's ``train.bin`` / ``val.bin`` into text shards that ``megaray train`` reads.

    Args:
        source: local folder holding ``train.bin`` and ``val.bin`` (not a URI: copy them first).
        out_dir: output folder (local or URI), the layout of :func:`megaray.data.text.prepare_text`:
            ``train/``, ``val/``, ``tokenizer.json``, ``manifest.json`` (kind ``text``), published
            atomically.
        tokenizer: the ``tokenizer.json`` the ids were encoded with (or a folder holding one); it
            must contain ``<|endoftext|>`` and cover every id; copied into ``out_dir``.
        dtype: ``"uint16"`` (nanoGPT's), ``"uint32"``, or ``"auto"``: uint16 when the tokenizer has
            at most 65,536 tokens, else uint32.
        max_row_tokens: longest row; longer documents (or a stream without EOS) are cut into rows
            of this length. The trainer's windows do not depend on it (module docstring).
        chunk_tokens: ids read per step (memory: a few times this many bytes).
        rows_per_group, group_tokens, tokens_per_shard: as :func:`prepare_text`.
        overwrite: replace an existing prepared ``out_dir``.

    Returns:
        The manifest dict: :func:`prepare_text`'s fields (``documents`` counts rows; ``tokens``
        the ids of each file, all of them; ``eos_tokens`` the EOS ids in it) plus ``nanogpt``
        ``{dtype, max_row_tokens, files: {split: {path, bytes, tokens, max_id}}}``.

    Raises:
        DataError: ``source`` is a URI, or a file is missing, empty or not a whole number of ids;
            an id >= the tokenizer's vocabulary size (file, max id, first position and size named);
            a missing tokenizer or one without ``<|endoftext|>``; ``out_dir`` already prepared
            (without ``overwrite``); bad arguments. Nothing is published on an error.
    """
    t0 = time.time()
    source = str(source)
    if fs.is_uri(source):
        raise DataError(
            f"{source}: nanoGPT .bin files are read from local disk; copy train.bin and val.bin to a local folder first"
        )
    if min(max_row_tokens, chunk_tokens, rows_per_group, group_tokens, tokens_per_shard) < 1:
        raise DataError(
            "max_row_tokens, chunk_tokens, rows_per_group, group_tokens and tokens_per_shard must be positive"
        )
    tok_path = str(tokenizer) if str(tokenizer).endswith(".json") else fs.join(str(tokenizer), "tokenizer.json")
    tok = load_tokenizer(tok_path)
    vocab, eos = tok.get_vocab_size(with_added_tokens=True), eos_id(tok)
    np_dtype = _resolve_dtype(dtype, vocab)
    fs.check_target(str(out_dir), overwrite)
    scans = {s: _scan(os.path.join(source, FILES[s]), np_dtype, vocab, eos, tok_path, chunk_tokens) for s in SPLITS}
    with fs.staged_dir(str(out_dir), overwrite, local=True) as stage_dir:
        stage = Path(stage_dir)
        tok.save(str(stage / "tokenizer.json"))
        writers = {}
        for s in SPLITS:
            writers[s] = ShardWriter(stage, s, vocab, rows_per_group, group_tokens, tokens_per_shard)
            _write_split(scans[s], np_dtype, eos, writers[s], max_row_tokens, chunk_tokens)
        tok_info = {
            "path": "tokenizer.json",
            "trained": False,
            "source": tok_path,
            "kind": tokenizer_kind(tok),
            "vocab_size": vocab,
            "eos_token": EOS,
            "eos_id": eos,
        }
        manifest = _manifest(source, scans, writers, tok_info, np_dtype, max_row_tokens)
        manifest["seconds"] = round(time.time() - t0, 2)
        write_manifest(stage_dir, manifest)
    if verbose:
        print(summarize(manifest, str(out_dir)))
    return manifest


def _manifest(
    source: str,
    scans: Dict[str, _Scan],
    writers: Dict[str, ShardWriter],
    tok_info: Dict[str, Any],
    dtype: np.dtype,
    max_row_tokens: int,
) -> Dict[str, Any]:
    splits: Dict[str, Any] = {}
    for s in SPLITS:
        w = writers[s]
        splits[s] = {
            "documents": sum(x["documents"] for x in w.shards),
            "tokens": sum(x["tokens"] for x in w.shards),
            "eos_tokens": scans[s].eos,
            "shards": w.shards,
            "unigram_entropy_nats": entropy(w.counts),
        }
        assert splits[s]["tokens"] == scans[s].tokens, (s, splits[s]["tokens"], scans[s].tokens)
    splits["val"]["unigram_cross_entropy_nats"] = cross_entropy(writers["val"].counts, writers["train"].counts)
    return new_manifest(
        "text",
        sources=[source],
        vocab_size=tok_info["vocab_size"],
        eos_id=tok_info["eos_id"],
        tokenizer=tok_info,
        splits=splits,
        unigram_entropy_nats=splits["val"]["unigram_entropy_nats"],
        nanogpt={
            "dtype": dtype.name,
            "max_row_tokens": max_row_tokens,
            "files": {
                s: {"path": sc.path, "bytes": sc.bytes, "tokens": sc.tokens, "max_id": sc.max_id}
                for s, sc in scans.items()
            },
        },
        rejected={"total": 0, "by_reason": {}},
    )


def summarize(manifest: Dict[str, Any], out_dir: str = "") -> str:
    """Human summary of an imported manifest (what :func:`import_nanogpt_bin` prints)."""
    tok, nano = manifest["tokenizer"], manifest["nanogpt"]
    lines = [
        f"imported nanoGPT .bin -> {out_dir or '.'}  ({manifest.get('seconds', 0):.1f} s)",
        f"  source:    {manifest['sources'][0]}  ({nano['dtype']}, rows cut at {tok['eos_token']}={tok['eos_id']}, "
        f"at most {nano['max_row_tokens']:,} tokens)",
        f"  tokenizer: {tok['source']}, vocab {tok['vocab_size']} -> tokenizer.json",
    ]
    for s in SPLITS:
        d, f = manifest["splits"][s], nano["files"][s]
        lines.append(
            f"  {s + ':':<6}    {d['tokens']:,} tokens ({f['bytes']:,} bytes, max id {f['max_id']}), "
            f"{d['eos_tokens']:,} EOS, {d['documents']:,} rows, {len(d['shards'])} shard(s), "
            f"unigram entropy {d['unigram_entropy_nats']:.3f} nats"
        )
    return "\n".join(lines + summary_lines(manifest["rejected"]))
