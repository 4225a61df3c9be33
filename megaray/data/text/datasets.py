"""Text shards -> packed LM windows through Ray Data, from one shard set or a weighted mixture.

Train (Ray Data, streaming)::

    (shard, row group) items  -> read_row_group (Ray tasks, pyarrow; corrupt row groups named)
      -> map_batches(Packer)   -> {"input_ids", "targets"}

``Packer`` is a stateful actor that concatenates documents (each already ends in EOS), carries the
remainder over to its next batch and cuts windows of ``block_size + 1`` tokens:
``input_ids = w[:-1]``, ``targets = w[1:]``, both int64 of shape ``(block_size,)``. With the default
single packer only the final remainder of the stream is lost, so the number of windows is exactly
``tokens // (block_size + 1)``, known without reading the data (:func:`num_windows`). With
``pack_concurrency=k`` it is at least that minus ``k - 1``.

Several shard sets (``data.sources``) must share one tokenizer; they are mixed per
:mod:`megaray.data.mixture` at row-group granularity, before packing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from megaray import fs
from megaray.data import mixture, shards as shard_io
from megaray.data.manifest import MANIFEST, prepare_hint, read_manifest
from megaray.data.splits import SPLITS
from megaray.data.text.writer import TOKENS_SCHEMA
from megaray.data.tokenizer import load_tokenizer
from megaray.errors import DataError

log = logging.getLogger(__name__)

#: one shard folder, or ``[(folder, weight), ...]`` / objects with ``.shards`` and ``.weight``.
Sources = Union[str, Sequence[Any]]


def load_manifest(shards: str) -> Dict[str, Any]:
    """The checked manifest of a text shard folder (:func:`megaray.data.manifest.read_manifest`).

    Raises:
        DataError: missing folder or manifest, corrupt, other version or kind; says to run
            ``megaray prepare text``.
    """
    return read_manifest(shards, "text")


def _hint(shards: str) -> str:
    return prepare_hint("text", shards)


def shard_paths(shards: str, manifest: Dict[str, Any], split: str) -> Tuple[pafs.FileSystem, List[str]]:
    """``(filesystem, paths)`` of one split's shard files as listed in the manifest."""
    if split not in manifest["splits"]:
        raise DataError(f"{shards}: no split {split!r} (have {', '.join(manifest['splits'])})")
    filesystem, _ = fs.resolve(shards)
    return filesystem, [fs.resolve(fs.join(shards, s["path"]))[1] for s in manifest["splits"][split]["shards"]]


def _row_groups(shards: str, manifest: Dict[str, Any], split: str) -> Tuple[pafs.FileSystem, List[Dict[str, Any]]]:
    """Footer check of one split (names a bad shard) -> its row-group items, in order."""
    filesystem, paths = shard_paths(shards, manifest, split)
    entries = manifest["splits"][split]["shards"]
    if not paths:
        raise DataError(f"{shards}: the {split} split has no shard files; {_hint(shards)}")
    displays = [fs.join(shards, e["path"]) for e in entries]
    return filesystem, shard_io.row_groups(filesystem, paths, displays, _hint(shards))


def check_shards(shards: str, manifest: Optional[Dict[str, Any]] = None, splits: Sequence[str] = SPLITS) -> None:
    """Open every shard's parquet footer (one small read each) and compare with the manifest.

    Catches missing, truncated or replaced files and wrong schemas before Ray starts reading.
    Corruption inside a data page is found when that row group is read (:mod:`megaray.data.shards`).

    Raises:
        DataError: naming the first bad shard file.
    """
    import pyarrow.parquet as pq

    manifest = manifest if manifest is not None else load_manifest(shards)
    for split in splits:
        filesystem, items = _row_groups(shards, manifest, split)
        rows: Dict[str, int] = {}
        for it in items:
            rows[it["display"]] = rows.get(it["display"], 0) + it["rows"]
        for path, entry in zip(shard_paths(shards, manifest, split)[1], manifest["splits"][split]["shards"]):
            where = fs.join(shards, entry["path"])
            with filesystem.open_input_file(path) as fh:
                schema = pq.ParquetFile(fh).schema_arrow
            if "tokens" not in schema.names or not pa.types.is_list(schema.field("tokens").type):
                raise DataError(f"shard {where} has no list column 'tokens' (schema: {schema}); {_hint(shards)}")
            if rows.get(where, 0) != entry["documents"]:
                raise DataError(
                    f"shard {where} has {rows.get(where, 0)} rows, {MANIFEST} says {entry['documents']}; "
                    f"{_hint(shards)}"
                )


def _normalize(sources: Sources) -> List[Tuple[str, float]]:
    if isinstance(sources, str) or hasattr(sources, "__fspath__"):
        return [(str(sources), 1.0)]
    out = []
    for s in sources:
        if isinstance(s, (tuple, list)):
            out.append((str(s[0]), float(s[1])))
        elif isinstance(s, str):
            out.append((s, 1.0))
        else:
            out.append((str(s.shards), float(s.weight)))
    if not out:
        raise DataError("data.sources: no shard sets given")
    return out


def check_same_tokenizer(sources: Sources) -> Dict[str, Any]:
    """Manifests of every source, checked to share one tokenizer (the first's manifest returned).

    Raises:
        DataError: a source is not prepared text, or two sources use different tokenizers
            (names both folders).
    """
    pairs = _normalize(sources)
    first, first_digest = None, None
    for folder, _ in pairs:
        m = load_manifest(folder)
        digest = _tokenizer_digest(folder, m)
        if first is None:
            first, first_digest = (folder, m), digest
        elif digest != first_digest:
            raise DataError(
                f"data.sources: {folder} and {first[0]} were tokenized with different tokenizers; "
                f"prepare every source with the same one (`megaray prepare text --tokenizer "
                f"{fs.join(first[0], 'tokenizer.json')} ...`)"
            )
    return first[1]


def _tokenizer_digest(folder: str, manifest: Dict[str, Any]) -> str:
    return hashlib.sha256(fs.read_bytes(fs.join(folder, manifest["tokenizer"]["path"]))).hexdigest()


def val_split_of(manifest: Dict[str, Any]) -> str:
    """The split of a ``data.val_shards`` folder that validation reads: ``val`` when it holds
    tokens, else ``train`` (a folder whose documents all went to one split)."""
    return "val" if int((manifest["splits"].get("val") or {}).get("tokens") or 0) > 0 else "train"


def check_val_shards(sources: Sources, val_shards: str) -> Tuple[Dict[str, Any], str]:
    """``(manifest, split)`` of a separate validation folder (``data.val_shards``): its manifest,
    checked to share the training shards' tokenizer, and the split validation reads
    (:func:`val_split_of`).

    Raises:
        DataError: ``val_shards`` is not prepared text (says how to prepare it), holds no tokens,
            or was tokenized with another tokenizer than the training shards (names both folders).
    """
    train_folder = _normalize(sources)[0][0]
    try:
        m = load_manifest(val_shards)
    except DataError as e:
        raise DataError(f"data.val_shards: {e}") from None
    if _tokenizer_digest(val_shards, m) != _tokenizer_digest(train_folder, load_manifest(train_folder)):
        raise DataError(
            f"data.val_shards: {val_shards} and the training shards {train_folder} were tokenized with "
            f"different tokenizers; prepare the validation text with the training shards' tokenizer "
            f"(`megaray prepare text --tokenizer {fs.join(train_folder, 'tokenizer.json')} --out "
            f"{val_shards} ...`)"
        )
    split = val_split_of(m)
    if not int(m["splits"][split].get("tokens") or 0):
        raise DataError(f"data.val_shards: {val_shards} holds no tokens; {_hint(val_shards)}")
    return m, split


@dataclass
class _Plan:
    """The row groups one split reads per epoch, and their tokens."""

    items: List[Tuple[pafs.FileSystem, Dict[str, Any]]]
    tokens: int


def _plan(sources: Sources, split: str, seed: int) -> _Plan:
    """Row groups of ``split`` over all sources, mixed by :mod:`megaray.data.mixture` (tokens)."""
    pairs = _normalize(sources)
    per_source = []
    for folder, _ in pairs:
        filesystem, items = _row_groups(folder, load_manifest(folder), split)
        per_source.append([(filesystem, it) for it in items])
    if len(pairs) == 1:
        items = per_source[0]
        return _Plan(items, sum(it["values"] for _, it in items))
    sizes = [sum(it["values"] for _, it in src) for src in per_source]
    targets = mixture.plan(sizes, [w for _, w in pairs])
    picks = [mixture.take_measured([it["values"] for _, it in src], t) for src, t in zip(per_source, targets)]
    order = mixture.interleave([len(p) for p in picks], seed)
    items = [per_source[i][picks[i][k]] for i, k in order]
    return _Plan(items, sum(it["values"] for _, it in items))


def num_windows(
    shards: Union[Sources, Dict[str, Any]],
    block_size: int,
    split: str = "train",
    pack_concurrency: int = 1,
    seed: int = 0,
) -> int:
    """Rows (windows of ``block_size``) :func:`text_datasets` yields for ``split``.

    ``tokens // (block_size + 1) - (pack_concurrency - 1)``, clamped at 0: exact for one packer,
    a lower bound otherwise. ``shards`` may be a folder, an already loaded manifest (read from
    it, no I/O) or a list of weighted sources (tokens of the mixture, from the shard footers).
    """
    if isinstance(shards, dict):
        tokens = int(shards["splits"][split]["tokens"])
    elif len(_normalize(shards)) == 1:
        tokens = int(load_manifest(_normalize(shards)[0][0])["splits"][split]["tokens"])
    else:
        tokens = _plan(shards, split, seed).tokens
    return max(0, tokens // (block_size + 1) - (pack_concurrency - 1))


def equal_batches(total_rows: int, num_workers: int, batch_size: int) -> int:
    """Batches each of ``num_workers`` ranks gets per epoch: ``total_rows // (num_workers * batch_size)``.

    ``streaming_split(num_workers, equal=True)`` gives every rank ``total_rows // num_workers``
    rows; ``iter_torch_batches(drop_last=True)`` then yields this many full batches on every
    rank. Stop each epoch after this many so ranks stay in lockstep.
    """
    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers}, {batch_size}")
    return max(0, int(total_rows)) // (num_workers * batch_size)


def unigram_entropy(shards: str, split: str = "val") -> float:
    """Entropy (nats/token) of ``split``'s unigram token distribution incl. EOS, from the manifest.

    The loss of the best context-free model fitted on that split itself: a trained LM's val loss
    must go below it. The manifest also holds ``unigram_cross_entropy_nats`` for val.
    """
    v = load_manifest(shards)["splits"][split]["unigram_entropy_nats"]
    if v is None:
        raise DataError(f"{shards}: split {split!r} has no tokens")
    return float(v)


def manifest_tokenizer(shards: str):
    """The :class:`tokenizers.Tokenizer` saved beside the shards (for decoding samples)."""
    return load_tokenizer(fs.join(shards, load_manifest(shards)["tokenizer"]["path"]))


# The packer carries state between calls, so each actor must run its batches in the order they
# arrive. Ray Data's actor pools default to ``allow_out_of_order_execution=True`` (a batch whose
# input is ready runs before an earlier one still being fetched), which reorders the token stream
# under load; and a restarted actor would silently drop its carry, so a crash fails the epoch
# (Ray Train then resumes from the last checkpoint) instead of being retried.
PACKER_ACTOR_OPTIONS = {"allow_out_of_order_execution": False, "max_restarts": 0, "max_task_retries": 0}


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
        return self.pack(col.flatten().to_numpy(zero_copy_only=False))

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
    shards: Sources,
    block_size: int,
    seed: int = 0,
    shuffle_buffer: int = 0,
    *,
    on_corrupt: str = "error",
    pack_concurrency: int = 1,
    pack_batch_size: int = 256,
    pack_num_cpus: float = 0.25,
    verify: bool = True,
    val_shards: Optional[str] = None,
) -> Dict[str, Any]:
    """Ray Datasets of packed LM windows for training: ``{"train": ds, "val": ds}``.

    Each row: ``input_ids`` int64 ``(block_size,)`` and ``targets`` int64 ``(block_size,)`` with
    ``targets[t] == input_ids[t + 1]`` inside a contiguous window of the document stream
    (documents end in EOS). Rows per split: :func:`num_windows`. Lazy: nothing is read until
    iterated (``streaming_split``/``iter_torch_batches``).

    Args:
        shards: a folder written by :func:`prepare_text` (local or URI), or weighted sources
            ``[(folder, weight), ...]`` / ``DataConfig.resolved_sources()``, mixed per
            :mod:`megaray.data.mixture` (both splits) and sharing one tokenizer.
        block_size: tokens per training sequence (the model's context length).
        seed: orders the mixture, and with ``shuffle_buffer > 0`` permutes the train row groups
            (the same permutation every epoch) and the windows inside each packer batch.
        shuffle_buffer: 0 = no train-side shuffling (fully ordered); > 0 enables the shuffles
            above. The trainer also passes it to ``iter_torch_batches(local_shuffle_buffer_size=...)``.
        on_corrupt: a row group whose data cannot be decoded: ``"error"`` (DataError naming the
            shard and row group) or ``"skip"`` (skipped, a warning line names it).
        pack_concurrency: packer actors per split. 1 (default) makes the row count exact.
        pack_batch_size: documents per packer call. pack_num_cpus: CPUs per packer actor.
        verify: compare shard footers with the manifest first (:func:`check_shards`).
        val_shards: a separate prepared folder whose windows make the ``val`` dataset
            (``data.val_shards``; its split per :func:`check_val_shards`); the training folders'
            own val splits are then not read. None = the val split of ``shards``.

    Raises:
        DataError: no/corrupt manifest ("run `megaray prepare text` first"), missing or corrupt
            shard (named), different tokenizers across sources or between ``shards`` and
            ``val_shards`` (both named), ``block_size < 1``.
    """
    from ray.data import ActorPoolStrategy

    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if shuffle_buffer < 0:
        raise DataError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    check_same_tokenizer(shards)
    reads = {"train": (shards, "train"), "val": (shards, "val")}  # dataset -> (sources, split)
    if val_shards is not None:
        reads["val"] = (val_shards, check_val_shards(shards, val_shards)[1])
    if verify:
        for folder, _ in _normalize(shards):
            check_shards(folder, splits=SPLITS if val_shards is None else ("train",))
        if val_shards is not None:
            check_shards(val_shards, splits=(reads["val"][1],))
    out = {}
    for split in SPLITS:
        plan = _plan(*reads[split], seed)
        shuffle = split == "train" and shuffle_buffer > 0
        items = plan.items
        if shuffle:
            items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
        out[split] = _read(items, on_corrupt).map_batches(
            Packer,
            fn_constructor_kwargs={"block_size": block_size, "shuffle_seed": seed if shuffle else None},
            batch_format="pyarrow",
            batch_size=pack_batch_size,
            compute=ActorPoolStrategy(size=pack_concurrency),
            num_cpus=pack_num_cpus,
            **PACKER_ACTOR_OPTIONS,
        )
    return out


def _read(items: List[Tuple[pafs.FileSystem, Dict[str, Any]]], on_corrupt: str) -> Any:
    """Rows of the planned row groups (one filesystem per run: every source on the same store)."""
    filesystem = items[0][0]
    if any(type(f) is not type(filesystem) for f, _ in items):
        raise DataError("data.sources: mix shard sets on one storage (all local, or all on the same object store)")
    return shard_io.read_dataset(
        filesystem,
        [it for _, it in items],
        ["tokens"],
        TOKENS_SCHEMA,
        on_corrupt,
        hint="re-run `megaray prepare text --overwrite` for that shard's folder",
    )


def text_stream(
    sources: Sources,
    spec: Any,
    epoch: int,
    cursor: int,
    last_epoch: int,
    micro_batch: int,
    *,
    on_corrupt: str = "error",
    pack_batch_size: int = 256,
    pack_num_cpus: float = 0.25,
) -> Any:
    """The train split as one positioned stream over epochs ``epoch .. last_epoch``, starting at
    window ``cursor`` of ``epoch`` (served windows, all ranks together; :mod:`megaray.data.text.stream`
    explains the order).

    Rows: ``input_ids``/``targets`` int64 ``(block_size,)`` plus ``epoch`` and ``index`` (the
    row's served position in its epoch, the same at any world size); blocks of exactly
    ``micro_batch`` rows, so ``streaming_split(world, equal=True)`` deals them round robin.
    Building it reads no data (the row-group token counts come from the footers).

    Args:
        spec: a :class:`megaray.data.text.stream.StreamSpec`; micro_batch: rows per rank per
            forward (``data.batch_size``).

    Raises:
        DataError: as :func:`text_datasets` (missing or corrupt shards, sources on different storage).
    """
    from ray.data import ActorPoolStrategy

    from megaray.data.text.stream import StreamPacker, stream_items

    plan = _plan(sources, "train", spec.seed)
    items, packer_args = stream_items([it for _, it in plan.items], spec, epoch, cursor, last_epoch, spec.chunk > 0)
    filesystem = plan.items[0][0]
    return (
        _read([(filesystem, it) for it in items], on_corrupt)
        .map_batches(
            StreamPacker,
            fn_constructor_kwargs={"spec": spec, **packer_args},
            batch_format="pyarrow",
            batch_size=pack_batch_size,
            compute=ActorPoolStrategy(size=1),
            num_cpus=pack_num_cpus,
            **PACKER_ACTOR_OPTIONS,
        )
        .repartition(target_num_rows_per_block=micro_batch, strict=True)
    )
