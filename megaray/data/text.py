"""Text data: prepare token shards once, then stream packed LM windows through Ray Data.

Prepare (driver-only, one process)::

    sources (.txt .md .jsonl .parquet, folders/globs/URIs, or "stdlib")
      -> validated documents, split train/val by a hash of each document's id
      -> byte-level BPE (trained on the train split, or loaded)
      -> parquet shards, one row per document: tokens list<int32> ending in EOS
      -> manifest.json, written last

    out_dir/
      manifest.json  tokenizer.json
      train/part-00000.parquet ...
      val/part-00000.parquet ...

Train (Ray Data, streaming)::

    read_parquet(shards of one split) -> map_batches(Packer) -> {"input_ids", "targets"}

``Packer`` is a stateful actor that concatenates documents (each already ends in EOS), carries the
remainder over to its next batch and cuts windows of ``block_size + 1`` tokens:
``input_ids = w[:-1]``, ``targets = w[1:]``, both int64 of shape ``(block_size,)``. With the default
single packer only the final remainder of the stream is lost, so the number of windows is exactly
``tokens // (block_size + 1)``, known from the manifest without reading the data
(:func:`num_windows`). With ``pack_concurrency=k`` it is at least that minus ``k - 1``.

Document semantics: a ``.txt``/``.md`` file is one document; a ``.jsonl`` line (field ``text``)
is one document; a ``.parquet`` row (column ``text``) is one document. Text is stripped of leading
and trailing whitespace.

Bad records are skipped and counted by reason in the manifest (``rejected``), never silently
dropped: ``empty_file``, ``empty`` (blank after strip, or null), ``undecodable_utf8``,
``binary`` (contains NUL), ``invalid_unicode`` (lone surrogates from JSON escapes),
``invalid_json``, ``no_text_field``, ``non_text`` (``text`` not a string), ``duplicate`` (exact
repeat of an earlier document), ``no_tokens``, ``unsupported_extension`` (one per file).
Structural problems are errors instead (:class:`DataError` naming the file): a corrupt or
truncated parquet file, a parquet file without a string ``text`` column. Silently training on
part of a dataset because an upload was truncated is worse than stopping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from megaray.data.sources import DataError, SourceFile, is_uri, join, list_files, resolve
from megaray.data.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "megaray.text/v1"
SPLITS = ("train", "val")
#: extensions read as documents; anything else is counted as ``unsupported_extension``.
SUPPORTED_EXTENSIONS = ("txt", "md", "jsonl", "parquet")
STDLIB = "stdlib"
TOKENS_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()))])
_EXAMPLES = 5
_SPOOL_BATCH = 1024


# ----------------------------------------------------------------------------- splitting


def split_key(doc_id: str, seed: int = 0) -> float:
    """Uniform [0, 1) number derived from ``blake2b(f"{seed}:{doc_id}")``; stable across runs."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` if ``split_key(doc_id, seed) < val_fraction`` else ``"train"``."""
    return "val" if split_key(doc_id, seed) < val_fraction else "train"


# ----------------------------------------------------------------------------- reading sources


class _Rejects:
    """Counts of skipped records by reason, with the first few places each happened."""

    def __init__(self) -> None:
        self.by_reason: Dict[str, Dict[str, Any]] = {}

    def add(self, reason: str, where: str, n: int = 1) -> None:
        e = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        e["count"] += n
        if len(e["examples"]) < _EXAMPLES and where not in e["examples"]:
            e["examples"].append(where)

    @property
    def total(self) -> int:
        return sum(e["count"] for e in self.by_reason.values())

    def to_json(self) -> Dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items()))}


def _clean(text: str, rejects: _Rejects, where: str) -> Optional[str]:
    if "\x00" in text:
        rejects.add("binary", where)
        return None
    text = text.strip()
    if not text:
        rejects.add("empty", where)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        rejects.add("invalid_unicode", where)
        return None
    return text


def _iter_documents(f: SourceFile, rejects: _Rejects) -> Iterator[Tuple[str, str]]:
    """``(doc_id, text)`` for every usable document of one file; rejects counted."""
    ext = f.extension
    if ext not in SUPPORTED_EXTENSIONS:
        rejects.add("unsupported_extension", f.display)
        return
    if f.size == 0:
        rejects.add("empty_file", f.display)
        return
    if ext in ("txt", "md"):
        try:
            text = f.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            rejects.add("undecodable_utf8", f.display)
            return
        text = _clean(text, rejects, f.display)
        if text is not None:
            yield f.relpath, text
    elif ext == "jsonl":
        for lineno, line in enumerate(f.iter_lines(), 1):
            if not line.strip():
                continue  # blank separator lines are not records
            where = f"{f.display}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError:
                rejects.add("undecodable_utf8", where)
                continue
            except ValueError:
                rejects.add("invalid_json", where)
                continue
            if not isinstance(obj, dict) or "text" not in obj:
                rejects.add("no_text_field", where)
                continue
            if obj["text"] is None:
                rejects.add("empty", where)
                continue
            if not isinstance(obj["text"], str):
                rejects.add("non_text", where)
                continue
            text = _clean(obj["text"], rejects, where)
            if text is None:
                continue
            rid = obj.get("id")
            doc_id = rid if isinstance(rid, str) and rid else f"{f.relpath}:{lineno}"
            yield doc_id, text
    else:  # parquet
        yield from _iter_parquet(f, rejects)


def _iter_parquet(f: SourceFile, rejects: _Rejects) -> Iterator[Tuple[str, str]]:
    try:
        fh = f.filesystem.open_input_file(f.path)
        pf = pq.ParquetFile(fh)
    except Exception as e:  # ArrowInvalid / OSError: bad magic, truncated footer
        raise DataError(f"corrupt or unreadable parquet file {f.display}: {e}") from None
    with fh:
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise DataError(f"parquet file {f.display} has no 'text' column (columns: {', '.join(schema.names)})")
        t = schema.field("text").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"):
            raise DataError(f"parquet file {f.display}: column 'text' has type {t}, expected string")
        row = 0
        try:
            for batch in pf.iter_batches(columns=["text"], batch_size=_SPOOL_BATCH):
                for value in batch.column(0).to_pylist():
                    where = f"{f.display}#{row}"
                    if value is None:
                        rejects.add("empty", where)
                    else:
                        text = _clean(value, rejects, where)
                        if text is not None:
                            yield f"{f.relpath}#{row}", text
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"corrupt parquet file {f.display} (failed at row {row}): {e}") from None


# ----------------------------------------------------------------------------- spooling


class _Spool:
    """Append-only Arrow IPC stream of texts on local disk (one per split)."""

    schema = pa.schema([pa.field("text", pa.large_string())])

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._buf: List[str] = []
        self.count = 0
        # for the "split must not be empty" fallback: the extreme split key seen
        self.extreme: Optional[Tuple[float, int]] = None

    def add(self, text: str) -> int:
        self._buf.append(text)
        self.count += 1
        if len(self._buf) >= _SPOOL_BATCH:
            self._flush()
        return self.count - 1

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_batch(pa.record_batch([pa.array(self._buf, pa.large_string())], schema=self.schema))
            self._buf = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def batches(self) -> Iterator[List[str]]:
        with pa.OSFile(str(self.path), "rb") as src:
            for batch in pa.ipc.open_stream(src):
                yield batch.column(0).to_pylist()


# ----------------------------------------------------------------------------- shard writing


class _ShardWriter:
    """Writes documents of one split into ``<root>/<split>/part-NNNNN.parquet``.

    A row group closes at ``rows_per_group`` documents or ``group_tokens`` tokens; a shard closes
    after the row group that brings it to ``tokens_per_shard`` tokens.
    """

    def __init__(self, root: Path, split: str, vocab: int, rows_per_group: int, group_tokens: int, tokens_per_shard: int):
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.rows_per_group, self.group_tokens, self.tokens_per_shard = rows_per_group, group_tokens, tokens_per_shard
        self.counts = np.zeros(vocab, dtype=np.int64)
        self.shards: List[Dict[str, Any]] = []
        self._writer: Optional[pq.ParquetWriter] = None
        self._cur: Dict[str, Any] = {}
        self._pending: List[Tuple[np.ndarray, np.ndarray]] = []  # (lengths, flat)
        self._pending_rows = 0
        self._pending_tokens = 0

    def add(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        """Queue documents: ``lengths`` (n,) int64 token counts, ``flat`` their concatenated int32 ids."""
        if len(lengths) == 0:
            return
        self._bincount(flat)
        self._pending.append((lengths, flat))
        self._pending_rows += len(lengths)
        self._pending_tokens += int(flat.size)
        while self._pending_rows >= self.rows_per_group or self._pending_tokens >= self.group_tokens:
            self._write_group()

    def _bincount(self, flat: np.ndarray) -> None:
        c = np.bincount(flat, minlength=len(self.counts))
        if len(c) > len(self.counts):
            raise DataError(f"token id {len(c) - 1} >= vocab size {len(self.counts)}")
        self.counts += c

    def _write_group(self) -> None:
        lengths = np.concatenate([p[0] for p in self._pending])
        flat = np.concatenate([p[1] for p in self._pending])
        ends = np.cumsum(lengths)
        # cut at whichever limit comes first (at least one row)
        n = min(len(lengths), self.rows_per_group)
        over = np.searchsorted(ends, self.group_tokens, side="left") + 1
        n = max(1, min(n, int(over)))
        cut = int(ends[n - 1])
        self._emit(lengths[:n], flat[:cut])
        rest_l, rest_f = lengths[n:], flat[cut:]
        self._pending = [(rest_l, rest_f)] if len(rest_l) else []
        self._pending_rows = len(rest_l)
        self._pending_tokens = int(rest_f.size)

    def _emit(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        if self._writer is None:
            name = f"part-{len(self.shards):05d}.parquet"
            path = self.dir / name
            self._writer = pq.ParquetWriter(str(path), TOKENS_SCHEMA, compression="zstd")
            self._cur = {"path": f"{self.split}/{name}", "documents": 0, "tokens": 0, "row_groups": 0}
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))
        self._writer.write_table(pa.Table.from_arrays([arr], schema=TOKENS_SCHEMA), row_group_size=len(lengths))
        self._cur["documents"] += len(lengths)
        self._cur["tokens"] += int(flat.size)
        self._cur["row_groups"] += 1
        if self._cur["tokens"] >= self.tokens_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._cur["bytes"] = (self.dir.parent / self._cur["path"]).stat().st_size
            self.shards.append(self._cur)

    def close(self) -> None:
        while self._pending_rows:
            self._write_group()
        self._close_shard()


def _entropy(counts: np.ndarray) -> Optional[float]:
    total = counts.sum()
    if total == 0:
        return None
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _cross_entropy(val: np.ndarray, train: np.ndarray) -> Optional[float]:
    """Val cross-entropy (nats/token) under the add-one-smoothed train unigram distribution."""
    if val.sum() == 0:
        return None
    q = (train + 1.0) / (train.sum() + len(train))
    return float(-(val * np.log(q)).sum() / val.sum())


# ----------------------------------------------------------------------------- prepare


def prepare_text(
    sources: Sequence[str],
    out_dir: str,
    vocab_size: int = 8192,
    tokenizer: Optional[str] = None,
    val_fraction: float = 0.02,
    rows_per_group: int = 1024,
    seed: int = 0,
    *,
    tokens_per_shard: int = 1 << 24,
    group_tokens: int = 1 << 20,
    min_frequency: int = 2,
    dedupe: bool = True,
    overwrite: bool = False,
    stdlib_max_docs: Optional[int] = None,
    progress: bool = True,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Tokenize text sources into train/val parquet shards plus ``manifest.json``.

    Args:
        sources: files, folders (recursive), globs or ``s3://``/``gs://``/``file://`` URIs of
            ``.txt``/``.md`` (a file is a document), ``.jsonl`` (field ``text``; optional string
            ``id`` used as the document id) and ``.parquet`` (column ``text``); or ``"stdlib"``
            for the embedded standard-library docstring corpus.
        out_dir: output folder (local or URI). Written atomically for local paths: built in
            ``<out_dir>.tmp-XXXX`` beside it, then renamed; for URIs built in a local temp folder
            and uploaded with ``manifest.json`` last.
        vocab_size: BPE vocabulary to train (incl. 256 byte symbols and EOS); ignored when
            ``tokenizer`` is given. The manifest records the size actually reached.
        tokenizer: path/URI of an existing ``tokenizer.json`` (must contain ``<|endoftext|>``);
            copied into ``out_dir``. None = train one on the train split.
        val_fraction: expected fraction of documents in val, 0 < f < 1. Documents are assigned
            by :func:`split_of` on their id (``relpath``, ``relpath:line``, ``relpath#row`` or the
            jsonl ``id``). If hashing leaves a split empty, the one document closest to the
            boundary is moved (noted in the manifest as ``moved_to_fill_split``).
        rows_per_group: documents per parquet row group (also capped by ``group_tokens``).
        seed: salts the split hash.
        tokens_per_shard: a shard file is closed once it holds this many tokens (~4 bytes each).
        group_tokens: a row group is closed once it holds this many tokens.
        min_frequency: BPE merge threshold.
        dedupe: skip exact duplicate texts (counted as ``duplicate``).
        overwrite: replace an existing prepared ``out_dir``.
        stdlib_max_docs: cap on documents taken from ``"stdlib"`` (tests, demos).
        progress: show tqdm bars (stderr). verbose: print the summary (stdout).

    Returns:
        The manifest dict (see ``docs/data.md`` for the schema). Token counts include the EOS
        appended to every document.

    Raises:
        DataError: a source is missing or an empty folder; a parquet source is corrupt or has no
            string ``text`` column; no usable documents; fewer than 2 documents; ``out_dir``
            already exists (without ``overwrite``); bad arguments. No complete-looking output is
            left behind: the temp folder is removed and ``out_dir`` is untouched.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    sources = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
    out_dir = str(out_dir)
    if not sources:
        raise DataError("prepare_text: no sources given (folders, files, globs, URIs or 'stdlib')")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if rows_per_group <= 0 or tokens_per_shard <= 0 or group_tokens <= 0:
        raise DataError("rows_per_group, tokens_per_shard and group_tokens must be positive")

    remote = is_uri(out_dir)
    tmp = _make_tmp(out_dir, remote, overwrite)
    try:
        spool_dir = tmp / "_spool"
        spool_dir.mkdir()
        spools = {s: _Spool(spool_dir / f"{s}.arrows") for s in SPLITS}
        rejects = _Rejects()
        seen: set = set()
        files_by_ext: Dict[str, int] = {}
        hidden = 0
        listings: List[Tuple[str, List[SourceFile]]] = []
        for src in sources:
            if src == STDLIB:
                from megaray.data.corpus import build_stdlib_corpus

                root = build_stdlib_corpus(tmp / "_stdlib", val_fraction=val_fraction, seed=seed, max_docs=stdlib_max_docs)
                listing = list_files(str(root / "train.jsonl")).files + list_files(str(root / "val.jsonl")).files
                listings.append((src, [SourceFile(f.filesystem, f.path, f"stdlib/{f.relpath}", f.relpath, f.size) for f in listing]))
            else:
                lst = list_files(src)
                hidden += lst.hidden
                listings.append((src, lst.files))
        n_files = sum(len(fs) for _, fs in listings)
        bar = tqdm(total=n_files, desc="read", unit="file", disable=not progress)
        for _, files in listings:
            for f in files:
                files_by_ext[f.extension or "(none)"] = files_by_ext.get(f.extension or "(none)", 0) + 1
                for doc_id, text in _iter_documents(f, rejects):
                    if dedupe:
                        key = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
                        if key in seen:
                            where = f.display + doc_id[len(f.relpath):] if doc_id.startswith(f.relpath) else f"{f.display} (id {doc_id})"
                            rejects.add("duplicate", where)
                            continue
                        seen.add(key)
                    u = split_key(doc_id, seed)
                    split = "val" if u < val_fraction else "train"
                    sp = spools[split]
                    idx = sp.add(text)
                    # remember the document closest to the boundary, in case a split ends empty
                    if split == "train" and (sp.extreme is None or u < sp.extreme[0]):
                        sp.extreme = (u, idx)
                    if split == "val" and (sp.extreme is None or u > sp.extreme[0]):
                        sp.extreme = (u, idx)
                bar.update(1)
                bar.set_postfix(docs=spools["train"].count + spools["val"].count, rejected=rejects.total)
        bar.close()
        del seen
        for sp in spools.values():
            sp.close()
        n_docs = spools["train"].count + spools["val"].count
        if n_docs == 0:
            raise DataError(
                f"no usable documents in {', '.join(sources)}; rejected: "
                + (", ".join(f"{k}={v['count']} (e.g. {v['examples'][0]})" for k, v in rejects.by_reason.items()) or "none")
            )
        if n_docs < 2:
            raise DataError(f"only {n_docs} usable document in {', '.join(sources)}: need at least 2 (one per split)")
        moved: Optional[Tuple[str, int]] = None  # (from split, spool index)
        if spools["val"].count == 0:
            moved = ("train", spools["train"].extreme[1])
        elif spools["train"].count == 0:
            moved = ("val", spools["val"].extreme[1])
        moved_text = None
        if moved is not None:
            moved_text = _spool_item(spools[moved[0]], moved[1])

        def split_texts(split: str) -> Iterator[List[str]]:
            base = 0
            for texts in spools[split].batches():
                if moved is not None and moved[0] == split and base <= moved[1] < base + len(texts):
                    texts = texts[: moved[1] - base] + texts[moved[1] - base + 1 :]
                    base += 1
                base += len(texts)
                if texts:
                    yield texts
            if moved is not None and moved[0] != split:
                yield [moved_text]

        # -- tokenizer
        if tokenizer is None:
            n_train = spools["train"].count - (moved is not None and moved[0] == "train")
            tok = train_tokenizer(
                (t for batch in split_texts("train") for t in batch),
                vocab_size,
                min_frequency=min_frequency,
                length=n_train,
                show_progress=progress,
            )
            tok_info = {"path": "tokenizer.json", "trained": True, "source": None, "min_frequency": min_frequency}
        else:
            tok = load_tokenizer(tokenizer)
            tok_info = {"path": "tokenizer.json", "trained": False, "source": str(tokenizer)}
        tok.save(str(tmp / "tokenizer.json"))
        eos = eos_id(tok)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        tok_info.update({"vocab_size": vocab, "eos_token": EOS, "eos_id": eos})

        # -- tokenize and write shards
        writers = {s: _ShardWriter(tmp, s, vocab, rows_per_group, group_tokens, tokens_per_shard) for s in SPLITS}
        bar = tqdm(total=n_docs, desc="tokenize", unit="doc", disable=not progress)
        for split in SPLITS:
            for texts in split_texts(split):
                lengths, flat, n_empty = _encode(tok, texts, eos)
                if n_empty:
                    rejects.add("no_tokens", f"{split} split", n_empty)
                writers[split].add(lengths, flat)
                bar.update(len(texts))
            writers[split].close()
        bar.close()

        splits: Dict[str, Any] = {}
        for s in SPLITS:
            w = writers[s]
            docs = sum(x["documents"] for x in w.shards)
            toks = sum(x["tokens"] for x in w.shards)
            splits[s] = {
                "documents": docs,
                "tokens": toks,
                "eos_tokens": docs,
                "shards": w.shards,
                "unigram_entropy_nats": _entropy(w.counts),
            }
        splits["val"]["unigram_cross_entropy_nats"] = _cross_entropy(writers["val"].counts, writers["train"].counts)
        for s in SPLITS:
            if splits[s]["documents"] == 0:
                raise DataError(f"{s} split ended empty after tokenization ({rejects.to_json()})")
        manifest: Dict[str, Any] = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": sources,
            "vocab_size": vocab,
            "eos_id": eos,
            "tokenizer": tok_info,
            "val_fraction": val_fraction,
            "seed": seed,
            "dedupe": dedupe,
            "moved_to_fill_split": None if moved is None else {"from": moved[0], "to": "val" if moved[0] == "train" else "train"},
            "splits": splits,
            "unigram_entropy_nats": splits["val"]["unigram_entropy_nats"],
            "files": {"read": n_files, "by_extension": dict(sorted(files_by_ext.items())), "hidden_skipped": hidden},
            "rejected": rejects.to_json(),
            "seconds": round(time.time() - t0, 2),
        }
        shutil.rmtree(spool_dir)
        shutil.rmtree(tmp / "_stdlib", ignore_errors=True)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
        _publish(tmp, out_dir, remote, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["seconds"] = round(time.time() - t0, 2)
    if verbose:
        print(summarize(manifest, out_dir))
    return manifest


def _spool_item(spool: _Spool, index: int) -> str:
    base = 0
    for texts in spool.batches():
        if index < base + len(texts):
            return texts[index - base]
        base += len(texts)
    raise IndexError(index)


def _encode(tok: Any, texts: List[str], eos: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Token ids of ``texts`` with EOS appended: ``(lengths (n,) int64, flat int32, n_empty)``."""
    encs = tok.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encs if e.ids]
    n_empty = len(encs) - len(ids)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for x in ids:
        n = len(x)
        flat[pos : pos + n] = x
        flat[pos + n] = eos
        pos += n + 1
    return lengths, flat, n_empty


def _make_tmp(out_dir: str, remote: bool, overwrite: bool) -> Path:
    if remote:
        fs, base = resolve(out_dir)
        if fs.get_file_info(posixpath.join(base, MANIFEST)).type != pafs.FileType.NotFound and not overwrite:
            raise DataError(f"{out_dir} already holds prepared data (manifest.json); pass overwrite=True to replace it")
        return Path(tempfile.mkdtemp(prefix="megaray-prepare-"))
    final = Path(out_dir).expanduser().resolve()
    if final.exists() and not overwrite:
        if (final / MANIFEST).exists():
            raise DataError(f"{out_dir} already holds prepared data (manifest.json); pass overwrite=True to replace it")
        if not final.is_dir() or any(final.iterdir()):
            raise DataError(f"{out_dir} exists and is not an empty folder; pass overwrite=True to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the published folder should not be
    return tmp


def _publish(tmp: Path, out_dir: str, remote: bool, overwrite: bool) -> None:
    """Move the finished temp folder into place; the manifest becomes visible last."""
    if remote:
        fs, base = resolve(out_dir)
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            # hide the old manifest first so readers never pair it with new shards
            try:
                fs.delete_file(posixpath.join(base, MANIFEST))
            except (FileNotFoundError, OSError):
                pass
            fs.delete_dir_contents(base, missing_dir_ok=True)
        fs.create_dir(base, recursive=True)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
        for p in files + [tmp / MANIFEST]:
            rel = p.relative_to(tmp).as_posix()
            dest = posixpath.join(base, rel)
            fs.create_dir(posixpath.dirname(dest), recursive=True)
            pafs.copy_files(str(p), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    final = Path(out_dir).expanduser().resolve()
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=final.name + ".old-", dir=final.parent))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summarize(manifest: Dict[str, Any], out_dir: str = "") -> str:
    """Human-readable multi-line summary of a manifest (what :func:`prepare_text` prints)."""
    sp, tok, rej = manifest["splits"], manifest["tokenizer"], manifest["rejected"]
    how = "trained byte-level BPE" if tok["trained"] else f"loaded {tok['source']}"
    lines = [
        f"prepared text -> {out_dir or '.'}  ({manifest.get('seconds', 0):.1f} s)",
        f"  sources:   {', '.join(manifest['sources'])}  ({manifest['files']['read']} files: "
        + ", ".join(f"{k}={v}" for k, v in manifest["files"]["by_extension"].items())
        + ")",
        f"  tokenizer: {how}, vocab {tok['vocab_size']}, eos {tok['eos_token']}={tok['eos_id']} -> tokenizer.json",
    ]
    for s in SPLITS:
        d = sp[s]
        lines.append(
            f"  {s + ':':<6}    {d['documents']:,} documents, {d['tokens']:,} tokens (incl. EOS), "
            f"{len(d['shards'])} shard(s), unigram entropy {d['unigram_entropy_nats']:.3f} nats"
        )
    xe = sp["val"].get("unigram_cross_entropy_nats")
    if xe is not None:
        lines.append(f"  baseline:  val unigram cross-entropy under train counts {xe:.3f} nats/token")
    if manifest.get("moved_to_fill_split"):
        m = manifest["moved_to_fill_split"]
        lines.append(f"  note:      hashing left {m['to']} empty; moved 1 document from {m['from']}")
    if rej["total"]:
        lines.append(f"  rejected:  {rej['total']:,}")
        for reason, e in rej["by_reason"].items():
            lines.append(f"    {reason:<22}{e['count']:>8,}  e.g. {', '.join(e['examples'][:3])}")
    else:
        lines.append("  rejected:  0")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading shards


def load_manifest(shards: str) -> Dict[str, Any]:
    """Read and sanity-check ``<shards>/manifest.json``.

    Raises:
        DataError: the folder or manifest is missing (a prepare that never finished leaves no
            manifest), the manifest is not valid JSON, or its format is unknown. The message
            says to run ``megaray prepare text``.
    """
    fs, base = resolve(shards)
    hint = f"run `megaray prepare text SOURCES... {shards}` first"
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise DataError(f"shard folder not found: {shards}; {hint}")
    mpath = posixpath.join(base, MANIFEST) if is_uri(shards) else os.path.join(base, MANIFEST)
    try:
        with fs.open_input_stream(mpath) as f:
            raw = f.read()
    except (FileNotFoundError, OSError):
        raise DataError(f"{shards} has no {MANIFEST} (not prepared, or a prepare that did not finish); {hint}") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DataError(f"corrupt {join(shards, MANIFEST)}: {e}; {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{join(shards, MANIFEST)}: format {got!r} is not {FORMAT!r}; {hint}")
    return manifest


def shard_paths(shards: str, manifest: Dict[str, Any], split: str) -> Tuple[pafs.FileSystem, List[str]]:
    """``(filesystem, paths)`` of one split's shard files as listed in the manifest."""
    if split not in manifest["splits"]:
        raise DataError(f"{shards}: no split {split!r} (have {', '.join(manifest['splits'])})")
    fs, base = resolve(shards)
    sep = posixpath if is_uri(shards) else os.path
    return fs, [sep.join(base, *s["path"].split("/")) for s in manifest["splits"][split]["shards"]]


def check_shards(shards: str, manifest: Optional[Dict[str, Any]] = None, splits: Sequence[str] = SPLITS) -> None:
    """Open every shard's parquet footer (cheap: one small read each) and compare with the manifest.

    Catches missing, truncated or replaced files and wrong schemas before Ray starts reading.
    Corruption inside a data page is only found when that page is read.

    Raises:
        DataError: naming the first bad shard file.
    """
    manifest = manifest if manifest is not None else load_manifest(shards)
    for split in splits:
        fs, paths = shard_paths(shards, manifest, split)
        if not paths:
            raise DataError(f"{shards}: the {split} split has no shard files")
        for path, entry in zip(paths, manifest["splits"][split]["shards"]):
            where = join(shards, entry["path"])
            try:
                with fs.open_input_file(path) as fh:
                    md = pq.ParquetFile(fh).metadata
                    schema = md.schema.to_arrow_schema()
            except FileNotFoundError:
                raise DataError(f"shard missing: {where} (listed in {MANIFEST}); re-run `megaray prepare text`") from None
            except Exception as e:
                raise DataError(f"corrupt shard {where}: {e}; re-run `megaray prepare text`") from None
            if "tokens" not in schema.names or not pa.types.is_list(schema.field("tokens").type):
                raise DataError(f"shard {where} has no list column 'tokens' (schema: {schema})")
            if md.num_rows != entry["documents"]:
                raise DataError(f"shard {where} has {md.num_rows} rows, manifest says {entry['documents']}; re-run prepare")


class Packer:
    """Ray Data callable class: documents (``tokens`` list column) -> LM windows.

    State: the tail of the token stream that did not fill a window, prepended to the next batch.
    Output per batch: ``input_ids`` and ``targets``, int64 ``(n, block_size)``.
    """

    def __init__(self, block_size: int, shuffle_seed: Optional[int] = None):
        self.window = block_size + 1
        self.carry = np.empty(0, dtype=np.int64)
        self.rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        self.skipped = 0

    def __call__(self, batch: pa.Table) -> Dict[str, np.ndarray]:
        col = batch.column("tokens")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        empty = int((lengths == 0).sum())
        if empty:
            self.skipped += empty
            log.warning("text packer: skipped %d empty rows (%d so far)", empty, self.skipped)
        values = col.flatten().to_numpy(zero_copy_only=False)
        return self.pack(values)

    def pack(self, values: np.ndarray) -> Dict[str, np.ndarray]:
        """Append ``values`` to the carried stream; return every full window."""
        stream = np.concatenate([self.carry, values.astype(np.int64, copy=False)])
        n = len(stream) // self.window
        self.carry = stream[n * self.window :].copy()
        w = stream[: n * self.window].reshape(n, self.window)
        if self.rng is not None and n > 1:
            w = w[self.rng.permutation(n)]
        return {"input_ids": np.ascontiguousarray(w[:, :-1]), "targets": np.ascontiguousarray(w[:, 1:])}


def text_datasets(
    shards: str,
    block_size: int,
    seed: int = 0,
    shuffle_buffer: int = 0,
    *,
    pack_concurrency: int = 1,
    pack_batch_size: int = 256,
    pack_num_cpus: float = 0.25,
    verify: bool = True,
) -> Dict[str, Any]:
    """Ray Datasets of packed LM windows for training: ``{"train": ds, "val": ds}``.

    Each row: ``input_ids`` int64 ``(block_size,)`` and ``targets`` int64 ``(block_size,)`` with
    ``targets[t] == input_ids[t + 1]`` inside a contiguous window of the document stream
    (documents end in EOS). Rows per split: :func:`num_windows`. Lazy: nothing is read until
    iterated (``streaming_split``/``iter_torch_batches``).

    Args:
        shards: folder written by :func:`prepare_text` (local or URI).
        block_size: tokens per training sequence (the model's context length).
        seed: seeds the train split's file-order shuffle (reseeded per epoch by Ray) and the
            in-batch window permutation.
        shuffle_buffer: 0 = no train-side shuffling at all (fully ordered, for debugging);
            > 0 enables the two shuffles above. The trainer also passes it to
            ``iter_torch_batches(local_shuffle_buffer_size=...)``. Val is never shuffled.
        pack_concurrency: packer actors per split. 1 (default) makes the row count exact;
            k > 1 can lose up to ``k - 1`` windows (each actor drops its own tail).
        pack_batch_size: documents per packer call.
        pack_num_cpus: logical CPUs reserved by each packer actor.
        verify: check every shard footer against the manifest first (:func:`check_shards`).

    Raises:
        DataError: no/corrupt manifest ("run `megaray prepare text` first"), missing or corrupt
            shard (named), ``block_size < 1``.
    """
    import ray
    from ray.data import ActorPoolStrategy, FileShuffleConfig

    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if shuffle_buffer < 0:
        raise DataError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    manifest = load_manifest(shards)
    if verify:
        check_shards(shards, manifest)
    out = {}
    for split in SPLITS:
        fs, paths = shard_paths(shards, manifest, split)
        shuffle = split == "train" and shuffle_buffer > 0
        ds = ray.data.read_parquet(
            paths,
            filesystem=fs,
            columns=["tokens"],
            shuffle=FileShuffleConfig(seed=seed) if shuffle else None,
        )
        out[split] = ds.map_batches(
            Packer,
            fn_constructor_kwargs={"block_size": block_size, "shuffle_seed": seed if shuffle else None},
            batch_format="pyarrow",
            batch_size=pack_batch_size,
            compute=ActorPoolStrategy(size=pack_concurrency),
            num_cpus=pack_num_cpus,
        )
    return out


def num_windows(shards: str | Dict[str, Any], block_size: int, split: str = "train", pack_concurrency: int = 1) -> int:
    """Rows (windows of ``block_size``) :func:`text_datasets` yields for ``split``, from the manifest.

    ``tokens // (block_size + 1) - (pack_concurrency - 1)``, clamped at 0: exact for one packer
    (a restarted packer actor could lose one more window), a lower bound otherwise.
    ``shards`` may be the folder or an already loaded manifest.
    """
    manifest = shards if isinstance(shards, dict) else load_manifest(shards)
    tokens = int(manifest["splits"][split]["tokens"])
    return max(0, tokens // (block_size + 1) - (pack_concurrency - 1))


def equal_batches(total_rows: int, num_workers: int, batch_size: int) -> int:
    """Batches each of ``num_workers`` ranks gets per epoch: ``total_rows // (num_workers * batch_size)``.

    ``streaming_split(num_workers, equal=True)`` gives every rank ``total_rows // num_workers``
    rows; ``iter_torch_batches(drop_last=True)`` then yields this many full batches on every
    rank. Stop each epoch after this many (``zip(range(n), it)``) so ranks stay in lockstep even
    if a packer restart lost a window.
    """
    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers}, {batch_size}")
    return max(0, int(total_rows)) // (num_workers * batch_size)


def unigram_entropy(shards: str, split: str = "val") -> float:
    """Entropy (nats/token) of ``split``'s unigram token distribution incl. EOS, from the manifest.

    The loss of the best context-free model fitted on that split itself: a trained LM's val loss
    must go below it. The manifest also holds ``unigram_cross_entropy_nats`` for val (train counts,
    add-one smoothing), a slightly higher and fairer baseline.
    """
    v = load_manifest(shards)["splits"][split]["unigram_entropy_nats"]
    if v is None:
        raise DataError(f"{shards}: split {split!r} has no tokens")
    return float(v)


def manifest_tokenizer(shards: str):
    """The :class:`tokenizers.Tokenizer` saved beside the shards (for decoding samples)."""
    manifest = load_manifest(shards)
    return load_tokenizer(join(shards, manifest["tokenizer"]["path"]))


# ----------------------------------------------------------------------------- raw text path


class _TokenizePack:
    """Ray Data callable class: raw ``text`` column -> tokenized, EOS-joined, packed windows."""

    def __init__(self, tokenizer_path: str, block_size: int):
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tok)
        self.packer = Packer(block_size)
        self.skipped = 0

    def __call__(self, batch: pa.Table) -> Dict[str, np.ndarray]:
        texts = []
        for t in batch.column("text").to_pylist():
            t = t.strip() if isinstance(t, str) and "\x00" not in t else ""
            if t:
                texts.append(t)
            else:
                self.skipped += 1
        _, flat, _ = _encode(self.tok, texts, self.eos) if texts else (None, np.empty(0, np.int32), 0)
        return self.packer.pack(flat)


def _as_text_table(batch: pa.Table) -> pa.Table:
    col = batch.column("text")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pa.table({"text": col.cast(pa.large_string())})
    out = []
    for t in col.to_pylist():
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8-sig")
            except UnicodeDecodeError:
                t = None
        out.append(t if isinstance(t, str) else None)
    return pa.table({"text": pa.array(out, pa.large_string())})


def raw_text_dataset(
    paths: Sequence[str],
    tokenizer_path: str,
    block_size: int,
    *,
    concurrency: int = 1,
    batch_size: int = 256,
    num_cpus: float = 1.0,
) -> Any:
    """Ray Dataset of packed windows straight from raw text, tokenized inside Ray Data.

    ``.jsonl`` via ``read_json(lines=True)`` (field ``text``), ``.parquet`` via ``read_parquet``
    (column ``text``), ``.txt``/``.md`` via ``read_binary_files`` (one document per file), then one
    ``map_batches`` stage of ``concurrency`` actors that each hold the tokenizer, encode with
    ``encode_batch``, append EOS and pack (same rows as :func:`text_datasets`). Undecodable/empty
    texts are skipped (not counted on the driver). Row count is unknown until consumed; each actor
    drops its own final tail. Use :func:`prepare_text` for validated, counted, reusable shards.

    Raises:
        DataError: missing source, no supported files.
    """
    import ray
    from ray.data import ActorPoolStrategy

    parts = []
    ignored = []
    for src in [paths] if isinstance(paths, str) else paths:
        # Ray resolves URIs itself; read_json(lines=True) accepts no filesystem argument.
        by_ext: Dict[str, List[str]] = {}
        for f in list_files(src).files:
            by_ext.setdefault(f.extension, []).append(f.display)
        ignored += [p for e, ps in by_ext.items() if e not in SUPPORTED_EXTENSIONS for p in ps]
        if by_ext.get("jsonl"):
            parts.append(ray.data.read_json(by_ext["jsonl"], lines=True).select_columns(["text"]))
        if by_ext.get("parquet"):
            parts.append(ray.data.read_parquet(by_ext["parquet"], columns=["text"]))
        txt = by_ext.get("txt", []) + by_ext.get("md", [])
        if txt:
            parts.append(ray.data.read_binary_files(txt).rename_columns({"bytes": "text"}))
    # one block type and schema for the union: arrow, text as large_string (bytes decoded)
    parts = [p.map_batches(_as_text_table, batch_format="pyarrow", batch_size=None) for p in parts]
    if ignored:
        log.warning("raw_text_dataset: ignoring %d files with unsupported extensions (e.g. %s)", len(ignored), ignored[0])
    if not parts:
        raise DataError(f"no .txt/.md/.jsonl/.parquet files in {paths}")
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        _TokenizePack,
        fn_constructor_kwargs={"tokenizer_path": str(tokenizer_path), "block_size": block_size},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
