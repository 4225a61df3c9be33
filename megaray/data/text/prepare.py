"""``prepare_text``: text sources -> token shards + tokenizer + manifest, in stages.

Driver-only, one process::

    sources (.txt .md .jsonl .parquet, folders/globs/URIs, "stdlib", or hf: datasets)
      -> _list_sources: files per source (the stdlib corpus is written as jsonl first; an hf:
         source is one HFTextSource whose rows are the documents)
      -> _read_and_split: validated documents (rejects counted), exact duplicates dropped, then
         cleaned (length, repetition, MinHash near duplicates: :mod:`.clean`) in read order before
         the split, so a near duplicate never lands in val beside its twin in train; split by a
         hash of each id, spooled to local disk per split
      -> _fill_empty_split: one document moved when hashing left a split empty
      -> _make_tokenizer: byte-level BPE (or unigram) trained on the train split, or loaded
      -> _write_shards: parquet shards, one row per document: tokens list<int32> ending in EOS
      -> manifest.json (kind "text"), written last by the atomic publish (megaray.fs.staged_dir)

    out_dir/
      manifest.json  tokenizer.json
      train/part-00000.parquet ...
      val/part-00000.parquet ...
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from megaray import fs
from megaray.data.hf import HFTextSource, is_hf
from megaray.data.manifest import new_manifest, write_manifest
from megaray.data.rejects import Rejects, summary_lines
from megaray.data.sources import SourceFile, list_files
from megaray.data.splits import SPLITS, split_key
from megaray.data.text.clean import CleanConfig, TextCleaner
from megaray.data.text.documents import iter_cells, iter_documents
from megaray.data.text.writer import ShardWriter, Spool, cross_entropy, encode, entropy, spool_item
from megaray.data.tokenizer import EOS, eos_id, load_tokenizer, tokenizer_kind, train_tokenizer
from megaray.errors import DataError

STDLIB = "stdlib"


@dataclass
class _Read:
    """What reading the sources produced (stages 1-3)."""

    spools: Dict[str, Spool]
    rejects: Rejects
    files_by_ext: Dict[str, int] = field(default_factory=dict)
    n_files: int = 0
    hidden: int = 0
    moved: Optional[Tuple[str, int]] = None  # (from split, spool index)
    moved_text: Optional[str] = None


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
    tokenizer_kind: str = "bpe",
    text_column: Optional[str] = None,
    clean: Optional[CleanConfig] = None,
) -> Dict[str, Any]:
    """Tokenize text sources into train/val parquet shards plus ``manifest.json``.

    Args:
        sources: files, folders (recursive), globs or ``s3://``/``gs://``/``file://`` URIs of
            ``.txt``/``.md`` (a file is a document), ``.jsonl`` (field ``text``; optional string
            ``id`` used as the document id) and ``.parquet`` (column ``text``); ``"stdlib"``
            for the embedded standard-library docstring corpus; or ``hf:NAME[:CONFIG][@SPLIT]`` /
            ``hf:./PATH[@SPLIT]`` Hugging Face datasets (:mod:`megaray.data.hf`; a row is a
            document, id ``hf:IDENT/SPLIT/ROW``).
        out_dir: output folder (local or URI), published atomically (:func:`megaray.fs.staged_dir`).
        vocab_size: BPE vocabulary to train (incl. 256 byte symbols and EOS); ignored when
            ``tokenizer`` is given. The manifest records the size actually reached.
        tokenizer: path/URI of an existing ``tokenizer.json`` (must contain ``<|endoftext|>``);
            copied into ``out_dir``. None = train one on the train split.
        val_fraction: expected fraction of documents in val, 0 < f < 1, by
            :func:`megaray.data.splits.split_of` on each document id (``relpath``,
            ``relpath:line``, ``relpath#row``, ``hf:IDENT/SPLIT/ROW`` or the jsonl ``id``). If hashing leaves a split
            empty, the document closest to the boundary is moved (``moved_to_fill_split``).
        rows_per_group: documents per parquet row group (also capped by ``group_tokens``).
        seed: salts the split hash.
        tokens_per_shard: a shard file is closed once it holds this many tokens (~4 bytes each).
        group_tokens: a row group is closed once it holds this many tokens.
        min_frequency: BPE merge threshold.
        dedupe: skip exact duplicate texts (counted as ``duplicate``).
        overwrite: replace an existing prepared ``out_dir``.
        stdlib_max_docs: cap on documents taken from ``"stdlib"`` (tests, demos).
        progress: show tqdm bars (stderr). verbose: print the summary (stdout).
        tokenizer_kind: what to train when ``tokenizer`` is None: ``"bpe"`` (byte-level BPE) or
            ``"unigram"`` (SentencePiece-style, :mod:`megaray.data.tokenizer`). The manifest's
            ``tokenizer.kind`` records the kind (also of a loaded tokenizer).
        text_column: the column of ``hf:`` sources holding the text (None: detect; see
            :mod:`megaray.data.hf`).
        clean: document filters after exact dedupe (:class:`megaray.data.text.clean.CleanConfig`:
            word-count bounds, Gopher repetition measures, MinHash near-duplicate removal); None =
            its defaults (near dedupe at Jaccard 0.8, duplicate-line fraction above 0.5);
            ``CleanConfig.off()`` = none. Rejects ``too_short``, ``too_long``, ``repetitive``,
            ``near_duplicate``; the manifest's ``clean`` records the settings.

    Returns:
        The manifest dict (schema in ``docs/data.md``). Token counts include the EOS appended to
        every document.

    Raises:
        DataError: a source is missing or an empty folder; a parquet source is corrupt or has no
            string ``text`` column; no usable documents; fewer than 2 documents; ``out_dir``
            already exists (without ``overwrite``); bad arguments. Nothing complete-looking is
            left behind: the staging folder is removed and ``out_dir`` is untouched.
    """
    t0 = time.time()
    sources = [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]
    _check_args(sources, val_fraction, rows_per_group, tokens_per_shard, group_tokens)
    with fs.staged_dir(str(out_dir), overwrite, local=True) as stage_dir:
        stage = Path(stage_dir)
        listings, hidden = _list_sources(
            sources, stage, val_fraction, seed, stdlib_max_docs, text_column, print if verbose else None
        )
        clean = CleanConfig() if clean is None else clean
        read = _read_and_split(listings, stage, dedupe, val_fraction, seed, progress, TextCleaner(clean))
        read.hidden = hidden
        _fill_empty_split(read, sources)
        tok, tok_info = _make_tokenizer(read, tokenizer, vocab_size, min_frequency, progress, tokenizer_kind)
        tok.save(str(stage / "tokenizer.json"))
        writers = _write_shards(read, tok, stage, rows_per_group, group_tokens, tokens_per_shard, progress)
        manifest = _build_manifest(read, writers, sources, tok_info, val_fraction, seed, dedupe, clean)
        shutil.rmtree(stage / "_spool")
        shutil.rmtree(stage / "_stdlib", ignore_errors=True)
        manifest["seconds"] = round(time.time() - t0, 2)
        write_manifest(stage_dir, manifest)
    if verbose:
        print(summarize(manifest, str(out_dir)))
    return manifest


def _check_args(
    sources: List[str], val_fraction: float, rows_per_group: int, tokens_per_shard: int, group_tokens: int
) -> None:
    if not sources:
        raise DataError("prepare_text: no sources given (folders, files, globs, URIs or 'stdlib')")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if rows_per_group <= 0 or tokens_per_shard <= 0 or group_tokens <= 0:
        raise DataError("rows_per_group, tokens_per_shard and group_tokens must be positive")


def _list_sources(
    sources: List[str],
    stage: Path,
    val_fraction: float,
    seed: int,
    stdlib_max_docs: Optional[int],
    text_column: Optional[str] = None,
    say: Any = None,
) -> Tuple[List[List[Any]], int]:
    """Stage 1: the files of every source (``stdlib`` is first written as jsonl into the stage; an
    ``hf:`` source is one :class:`HFTextSource`, its column chosen and said through ``say``)."""
    from megaray.data.stdlib import build_stdlib_corpus

    listings, hidden = [], 0
    for src in sources:
        if src == STDLIB:
            root = build_stdlib_corpus(
                stage / "_stdlib", val_fraction=val_fraction, seed=seed, max_docs=stdlib_max_docs
            )
            files = list_files(str(root / "train.jsonl")).files + list_files(str(root / "val.jsonl")).files
            listings.append([SourceFile(f.filesystem, f.path, f"stdlib/{f.relpath}", f.relpath, f.size) for f in files])
        elif is_hf(src):
            listings.append([HFTextSource(src, text_column, say)])
        else:
            lst = list_files(src)
            hidden += lst.hidden
            listings.append(lst.files)
    return listings, hidden


def _read_and_split(
    listings: List[List[Any]],
    stage: Path,
    dedupe: bool,
    val_fraction: float,
    seed: int,
    progress: bool,
    cleaner: Optional[TextCleaner] = None,
) -> _Read:
    """Stages 2-3: documents of every file, deduplicated and cleaned, split by id hash, spooled per split."""
    from tqdm.auto import tqdm

    (stage / "_spool").mkdir()
    read = _Read(spools={s: Spool(stage / "_spool" / f"{s}.arrows") for s in SPLITS}, rejects=Rejects())
    seen: set = set()
    read.n_files = sum(len(files) for files in listings)
    bar = tqdm(total=read.n_files, desc="read", unit="file", disable=not progress)
    for files in listings:
        for f in files:
            ext = f.extension or "(none)"
            read.files_by_ext[ext] = read.files_by_ext.get(ext, 0) + 1
            hf = isinstance(f, HFTextSource)
            docs = iter_cells(f.records(), read.rejects) if hf else iter_documents(f, read.rejects)
            for doc_id, text in docs:
                if dedupe:
                    key = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
                    if key in seen:
                        read.rejects.add("duplicate", _where(f, doc_id))
                        continue
                    seen.add(key)
                verdict = cleaner.check(doc_id, text) if cleaner is not None else None
                if verdict is not None:
                    read.rejects.add(verdict[0], _where(f, doc_id), detail=verdict[1])
                    continue
                _spool(read.spools, doc_id, text, val_fraction, seed)
            bar.update(1)
            bar.set_postfix(docs=read.spools["train"].count + read.spools["val"].count, rejected=read.rejects.total)
    bar.close()
    for sp in read.spools.values():
        sp.close()
    return read


def _where(f: Any, doc_id: str) -> str:
    """A reject's place: the file's display path plus the id's suffix (``:line``, ``#row``), or the id."""
    rel = doc_id[len(f.relpath) :] if doc_id.startswith(f.relpath) else None
    return f.display + rel if rel is not None else f"{f.display} (id {doc_id})"


def _spool(spools: Dict[str, Spool], doc_id: str, text: str, val_fraction: float, seed: int) -> None:
    u = split_key(doc_id, seed)
    split = "val" if u < val_fraction else "train"
    sp = spools[split]
    idx = sp.add(text)
    # remember the document closest to the boundary, in case the other split ends empty
    if (split == "train" and (sp.extreme is None or u < sp.extreme[0])) or (
        split == "val" and (sp.extreme is None or u > sp.extreme[0])
    ):
        sp.extreme = (u, idx)


def _fill_empty_split(read: _Read, sources: List[str]) -> None:
    """Stage 4: errors for too few documents; move one document into an empty split."""
    sp = read.spools
    n_docs = sp["train"].count + sp["val"].count
    if n_docs == 0:
        raise DataError(f"no usable documents in {', '.join(sources)}; rejected: {read.rejects.describe()}")
    if n_docs < 2:
        raise DataError(f"only {n_docs} usable document in {', '.join(sources)}: need at least 2 (one per split)")
    if sp["val"].count == 0:
        read.moved = ("train", sp["train"].extreme[1])
    elif sp["train"].count == 0:
        read.moved = ("val", sp["val"].extreme[1])
    if read.moved is not None:
        read.moved_text = spool_item(sp[read.moved[0]], read.moved[1])


def _split_texts(read: _Read, split: str) -> Iterator[List[str]]:
    """Batches of one split's texts in spool order, with the moved document relocated."""
    moved, base = read.moved, 0
    for texts in read.spools[split].batches():
        if moved is not None and moved[0] == split and base <= moved[1] < base + len(texts):
            texts = texts[: moved[1] - base] + texts[moved[1] - base + 1 :]
            base += 1
        base += len(texts)
        if texts:
            yield texts
    if moved is not None and moved[0] != split:
        yield [read.moved_text]


def _make_tokenizer(
    read: _Read, tokenizer: Optional[str], vocab_size: int, min_frequency: int, progress: bool, kind: str = "bpe"
) -> Tuple[Any, Dict[str, Any]]:
    """Stage 5: train a tokenizer of ``kind`` on the train split, or load ``tokenizer``."""
    if tokenizer is None:
        n_train = read.spools["train"].count - (read.moved is not None and read.moved[0] == "train")
        tok = train_tokenizer(
            (t for batch in _split_texts(read, "train") for t in batch),
            vocab_size,
            min_frequency=min_frequency,
            length=n_train,
            show_progress=progress,
            kind=kind,
        )
        info = {"path": "tokenizer.json", "trained": True, "source": None, "min_frequency": min_frequency}
    else:
        tok = load_tokenizer(tokenizer)
        info = {"path": "tokenizer.json", "trained": False, "source": str(tokenizer)}
    info.update(
        {
            "kind": tokenizer_kind(tok),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "eos_token": EOS,
            "eos_id": eos_id(tok),
        }
    )
    return tok, info


def _write_shards(
    read: _Read, tok: Any, stage: Path, rows_per_group: int, group_tokens: int, tokens_per_shard: int, progress: bool
) -> Dict[str, ShardWriter]:
    """Stage 6: tokenize each split (EOS appended) into parquet shards."""
    from tqdm.auto import tqdm

    eos, vocab = eos_id(tok), tok.get_vocab_size(with_added_tokens=True)
    writers = {s: ShardWriter(stage, s, vocab, rows_per_group, group_tokens, tokens_per_shard) for s in SPLITS}
    bar = tqdm(total=sum(sp.count for sp in read.spools.values()), desc="tokenize", unit="doc", disable=not progress)
    for split in SPLITS:
        for texts in _split_texts(read, split):
            lengths, flat, n_empty = encode(tok, texts, eos)
            if n_empty:
                read.rejects.add("no_tokens", f"{split} split", n_empty)
            writers[split].add(lengths, flat)
            bar.update(len(texts))
        writers[split].close()
    bar.close()
    return writers


def _build_manifest(
    read: _Read,
    writers: Dict[str, ShardWriter],
    sources: List[str],
    tok_info: Dict[str, Any],
    val_fraction: float,
    seed: int,
    dedupe: bool,
    clean: Optional[CleanConfig] = None,
) -> Dict[str, Any]:
    """Stage 7: the manifest (kind ``text``)."""
    splits: Dict[str, Any] = {}
    for s in SPLITS:
        w = writers[s]
        docs = sum(x["documents"] for x in w.shards)
        splits[s] = {
            "documents": docs,
            "tokens": sum(x["tokens"] for x in w.shards),
            "eos_tokens": docs,
            "shards": w.shards,
            "unigram_entropy_nats": entropy(w.counts),
        }
        if docs == 0:
            raise DataError(f"{s} split ended empty after tokenization (rejected: {read.rejects.describe()})")
    splits["val"]["unigram_cross_entropy_nats"] = cross_entropy(writers["val"].counts, writers["train"].counts)
    moved = read.moved
    return new_manifest(
        "text",
        sources=sources,
        vocab_size=tok_info["vocab_size"],
        eos_id=tok_info["eos_id"],
        tokenizer=tok_info,
        val_fraction=val_fraction,
        seed=seed,
        dedupe=dedupe,
        clean=None if clean is None else clean.to_json(),
        moved_to_fill_split=None
        if moved is None
        else {"from": moved[0], "to": "val" if moved[0] == "train" else "train"},
        splits=splits,
        unigram_entropy_nats=splits["val"]["unigram_entropy_nats"],
        files={
            "read": read.n_files,
            "by_extension": dict(sorted(read.files_by_ext.items())),
            "hidden_skipped": read.hidden,
        },
        rejected=read.rejects.to_json(),
    )


def summarize(manifest: Dict[str, Any], out_dir: str = "") -> str:
    """Human-readable multi-line summary of a text manifest (what :func:`prepare_text` prints)."""
    sp, tok = manifest["splits"], manifest["tokenizer"]
    kind = {"bpe": "byte-level BPE", "unigram": "unigram"}.get(tok.get("kind", "bpe"), tok.get("kind"))
    how = f"trained {kind}" if tok["trained"] else f"loaded {tok['source']}"
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
    return "\n".join(lines + summary_lines(manifest["rejected"]))
