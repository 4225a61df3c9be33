"""Writing token shards: a local spool of texts per split, then parquet shards of token lists.

Shard files hold one row per document, column ``tokens`` list<int32> ending in EOS, zstd
compressed with page checksums (so corrupt data pages are detected when read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megaray.errors import DataError

TOKENS_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()))])
_SPOOL_BATCH = 1024


class Spool:
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


class ShardWriter:
    """Writes documents of one split into ``<root>/<split>/part-NNNNN.parquet``.

    A row group closes at ``rows_per_group`` documents or ``group_tokens`` tokens; a shard closes
    after the row group that brings it to ``tokens_per_shard`` tokens.
    """

    def __init__(
        self, root: Path, split: str, vocab: int, rows_per_group: int, group_tokens: int, tokens_per_shard: int
    ):
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
            self._writer = pq.ParquetWriter(str(path), TOKENS_SCHEMA, compression="zstd", write_page_checksum=True)
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


def entropy(counts: np.ndarray) -> Optional[float]:
    total = counts.sum()
    if total == 0:
        return None
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def cross_entropy(val: np.ndarray, train: np.ndarray) -> Optional[float]:
    """Val cross-entropy (nats/token) under the add-one-smoothed train unigram distribution."""
    if val.sum() == 0:
        return None
    q = (train + 1.0) / (train.sum() + len(train))
    return float(-(val * np.log(q)).sum() / val.sum())


def spool_item(spool: Spool, index: int) -> str:
    base = 0
    for texts in spool.batches():
        if index < base + len(texts):
            return texts[index - base]
        base += len(texts)
    raise IndexError(index)


def encode(tok: Any, texts: List[str], eos: int) -> Tuple[np.ndarray, np.ndarray, int]:
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
