"""The positioned row stream: an epoch's samples in one world-independent order, readable from any cursor.

What text windows get from :mod:`megaray.data.text.stream`, for every family whose samples are
rows of prepared parquet shards (audio clips, images, latents) or rows held in memory (SFT
windows). The order (:mod:`megaray.data.order` has the batch arithmetic) is a pure function of
``(seed, epoch)``:

1. **Pieces.** Epoch ``e`` reads the split ``passes`` times; pass ``p`` takes the row groups
   ("items", :func:`megaray.data.shards.row_groups`) in a permutation seeded by
   ``(seed, e, p)`` (file order when not shuffling). The pieces of the epoch are those
   ``(item, pass)`` pairs, pass-major; their rows, in order, are the epoch's *stream*.
2. **Blocks.** Consecutive pieces form shuffle blocks of at least ``B_s =
   order.block_size(shuffle_block, G)`` rows (greedy: a block closes at the first piece that
   reaches ``B_s``; without shuffling, of at least one global batch ``G``). Block ``k``'s rows
   are permuted by ``np.random.default_rng([seed, e, k, 0xB10C])`` (kept in stream order
   without shuffling).
3. **Positions.** The permuted blocks, concatenated, are the epoch's served order: position
   ``i`` (the ``index`` column) is the ``i``-th row; the epoch serves its first ``plan.served``
   positions (whole global batches). Step ``s`` trains on positions ``[s G, (s + 1) G)``, at any
   world size (rows are dealt round robin by micro-batch: :mod:`megaray.data.order`).

A stream starting at ``cursor`` (a multiple of ``G``) starts at the block that holds it and drops
the positions before it: a resume reads one block more than it serves, never the epoch. Memory
in a read task is one block of raw rows (lower ``data.shuffle_block`` for large rows).

Corrupt row groups (``on_corrupt="skip"``) are filled, so every position keeps a row and every
rank the same number of micro-batches: the missing rows are taken, cycled, from the rows of the
same block that could be read (a warning names the row group). A block none of whose row groups
can be read is a :class:`DataError`.

API:

* :func:`epoch_blocks` / :func:`block_permutation` / :func:`served_rows`: the order as numpy
  (tests; in-memory data).
* :func:`positioned_rows`: a Ray Dataset of shard rows (``columns`` + ``pass``, ``epoch``,
  ``index``) from ``(epoch, cursor)`` through ``last_epoch``.
* :func:`map_positioned`: the family's per-row map (a crop), keeping ``epoch`` and ``index``, cut
  into blocks of one micro-batch (``repartition(strict=True)``) for ``streaming_split``.
* :func:`positioned_table`: the same stream over in-memory columns (SFT's packed windows).
* :func:`split_items`: a prepared folder's split as read items (footers checked);
  :func:`last_epoch`: the last epoch ``train.max_steps`` reads.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from megaray.data import order as order_lib, shards as shard_io
from megaray.errors import DataError

log = logging.getLogger(__name__)

_PIECES = 0x9A55  # seeds the per-(epoch, pass) row-group permutation
_BLOCK = 0xB10C  # seeds the in-block permutation


@dataclass(frozen=True)
class EpochOrder:
    """What fixes an epoch's served order (nothing here depends on the world size).

    Attributes:
        seed: ``train.seed``. block: rows per shuffle block (``order.block_size``; 0 = no
            shuffling). global_batch: ``G``. served: positions served per epoch (``plan.served``).
        passes: reads of the split per epoch (pass ``p`` seeds the family's crops).
    """

    seed: int
    block: int
    global_batch: int
    served: int
    passes: int = 1

    @classmethod
    def of(cls, plan: Any, seed: int, shuffle_block: int, passes: int = 1) -> "EpochOrder":
        """The order of a :class:`~megaray.data.order.BatchPlan` with ``data.shuffle_block``."""
        return cls(
            int(seed),
            order_lib.block_size(int(shuffle_block), plan.global_batch),
            int(plan.global_batch),
            int(plan.served),
            int(passes),
        )

    @property
    def shuffle(self) -> bool:
        return self.block > 0


#: most uncompressed bytes of rows one shuffle block holds in a read task: ``data.shuffle_block``
#: counts samples, and 65,536 four-second clips or 256 px images would be 10+ GB
BLOCK_BYTES = 512 << 20


def capped_block(shuffle_block: int, items: Sequence[Mapping[str, Any]], budget: int = BLOCK_BYTES) -> int:
    """``shuffle_block`` lowered so that one block of the items' rows (at their mean uncompressed
    size, from the parquet footers) holds at most ``budget`` bytes; unchanged when the items carry
    no sizes or the block already fits (0 stays 0: no shuffling)."""
    rows = sum(int(it.get("rows", 0)) for it in items)
    size = sum(int(it.get("bytes") or 0) for it in items)
    if shuffle_block <= 0 or not rows or not size:
        return shuffle_block
    return max(1, min(int(shuffle_block), int(budget * rows // size)))


def last_epoch(max_steps: int, epoch: int, plan: Any) -> int:
    """The last epoch a run of ``max_steps`` optimizer steps reads (at least ``epoch``)."""
    return max(int(epoch), (int(max_steps) - 1) // plan.steps_per_epoch)


def epoch_pieces(rows: Sequence[int], o: EpochOrder, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(item, pass)`` int64 arrays of epoch ``epoch``'s pieces in stream order (module docstring, 1)."""
    n = len(rows)
    perms = [
        np.random.default_rng([o.seed, epoch, p, _PIECES]).permutation(n) if o.shuffle else np.arange(n)
        for p in range(o.passes)
    ]
    return np.concatenate(perms).astype(np.int64), np.repeat(np.arange(o.passes, dtype=np.int64), n)


@dataclass(frozen=True)
class Block:
    """Shuffle block ``k`` of an epoch: pieces ``[lo, hi)`` of :func:`epoch_pieces`, stream rows
    (= positions) ``[start, start + rows)``."""

    k: int
    lo: int
    hi: int
    start: int
    rows: int


def epoch_blocks(rows: Sequence[int], o: EpochOrder, epoch: int) -> Tuple[List[Block], np.ndarray, np.ndarray]:
    """The blocks of epoch ``epoch`` that hold served positions, with its pieces
    (:func:`epoch_pieces`).

    Raises:
        DataError: the epoch's rows (``passes x sum(rows)``) are fewer than ``o.served``.
    """
    item, passes = epoch_pieces(rows, o, epoch)
    r = np.asarray(rows, np.int64)[item] if len(item) else np.zeros(0, np.int64)
    ends = np.cumsum(r)
    if not len(ends) or ends[-1] < o.served:
        raise DataError(
            f"the split holds {int(ends[-1]) if len(ends) else 0} rows in {o.passes} pass(es), fewer than "
            f"the {o.served} an epoch serves"
        )
    target = o.block or o.global_batch
    blocks: List[Block] = []
    lo, start = 0, 0
    while start < o.served:  # one searchsorted per block, not a loop over pieces
        hi = min(int(np.searchsorted(ends, start + target, side="left")) + 1, len(r))
        blocks.append(Block(len(blocks), lo, hi, start, int(ends[hi - 1]) - start))
        lo, start = hi, int(ends[hi - 1])
    return blocks, item, passes


def block_permutation(o: EpochOrder, epoch: int, k: int, n: int) -> np.ndarray:
    """Served order of the ``n`` stream rows of block ``k``: a permutation seeded by
    ``(seed, epoch, k)``, or ``arange(n)`` without shuffling."""
    if not o.shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([o.seed, epoch, k, _BLOCK]).permutation(n).astype(np.int64)


def served_rows(rows: Sequence[int], o: EpochOrder, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
    """The source row (its index in the split's rows in file order: items in order, rows inside
    each) and the pass of every served position ``0 .. o.served - 1`` of ``epoch``: two int64
    arrays of length ``o.served``. Pure numpy: what :func:`positioned_rows` serves, without reading.

    Raises:
        DataError: fewer rows than ``o.served`` (:func:`epoch_blocks`).
    """
    blocks, item, passes = epoch_blocks(rows, o, epoch)
    sizes = np.asarray(rows, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ids, ps = [], []
    for b in blocks:
        it = item[b.lo : b.hi]
        r = sizes[it]
        within = np.arange(int(r.sum()), dtype=np.int64) - np.repeat(np.cumsum(r) - r, r)
        perm = block_permutation(o, epoch, b.k, b.rows)
        ids.append((np.repeat(offsets[it], r) + within)[perm])
        ps.append(np.repeat(passes[b.lo : b.hi], r)[perm])
    return np.concatenate(ids)[: o.served], np.concatenate(ps)[: o.served]


def _stream_blocks(
    rows: Sequence[int], o: EpochOrder, epoch: int, cursor: int, last_epoch: int
) -> Tuple[int, List[Dict[str, Any]]]:
    """``(first epoch, block dicts)`` from position ``cursor`` of ``epoch`` through ``last_epoch``:
    ``{"epoch", "block", "start", "first", "stop", "pieces", "passes"}`` (``first``/``stop``: the
    served positions of the block the stream keeps)."""
    if cursor < 0 or cursor % o.global_batch:
        raise ValueError(f"cursor {cursor} is not a multiple of the global batch {o.global_batch}")
    if cursor >= o.served:  # the checkpoint closed an epoch
        epoch, cursor = epoch + 1, 0
    out = []
    for e in range(epoch, max(epoch, last_epoch) + 1):
        blocks, item, passes = epoch_blocks(rows, o, e)
        for b in blocks:
            if e == epoch and b.start + b.rows <= cursor:
                continue
            out.append(
                {
                    "epoch": e,
                    "block": b.k,
                    "start": b.start,
                    "first": max(b.start, cursor if e == epoch else 0),
                    "stop": min(b.start + b.rows, o.served),
                    "pieces": item[b.lo : b.hi].tolist(),
                    "passes": passes[b.lo : b.hi].tolist(),
                }
            )
    return epoch, out


# -- shard rows ---------------------------------------------------------------------------------
def split_items(
    shards: str, man: Mapping[str, Any], split: str, columns: Sequence[str]
) -> Tuple[Any, List[Dict[str, Any]], pa.Schema, str]:
    """``(filesystem, items, schema, hint)`` of one split of a prepared folder (``man["splits"][split]
    ["dir"]``, every kind but text): its row groups in file order (footers read and checked), the
    arrow schema of ``columns`` and the prepare command for a corrupt shard.

    Raises:
        DataError: the split holds no parquet file, a shard is missing or has a corrupt footer
            (named, with the prepare command).
    """
    import pyarrow.parquet as pq

    from megaray import fs
    from megaray.data.manifest import prepare_hint

    filesystem, paths, displays = shard_io.split_files(shards, dict(man), split)
    hint = prepare_hint(man.get("kind", "text"), shards) + " with --overwrite"
    if not paths:
        raise DataError(f"{fs.join(shards, man['splits'][split]['dir'])} holds no parquet files; {hint}")
    items = shard_io.row_groups(filesystem, paths, displays, hint)
    with filesystem.open_input_file(paths[0]) as fh:
        full = pq.ParquetFile(fh).schema_arrow
    return filesystem, items, pa.schema([full.field(c) for c in columns]), hint


def split_rows(
    cfg: Any,
    shards: str,
    man: Mapping[str, Any],
    columns: Sequence[str],
    *,
    plan: Any,
    epoch: int,
    cursor: int,
    passes: int = 1,
) -> Any:
    """:func:`positioned_rows` of the ``train`` split of ``shards`` (:func:`split_items`) with the
    run's settings: ``cfg`` (a :class:`~megaray.config.RunConfig`) gives the shuffle seed
    (``train.seed``), ``data.shuffle_block``, ``data.on_corrupt`` and the last epoch that
    ``train.max_steps`` reaches. The one call every row-stream task makes; ``passes`` reads of the
    split make an epoch.

    Raises:
        DataError: a missing or corrupt shard of the split (names it and the prepare command).
    """
    filesystem, items, schema, hint = split_items(shards, man, "train", columns)
    return positioned_rows(
        filesystem,
        items,
        columns,
        schema,
        seed=cfg.train.seed,
        shuffle_block=cfg.data.shuffle_block,
        plan=plan,
        epoch=epoch,
        cursor=cursor,
        last_epoch=last_epoch(cfg.train.max_steps, epoch, plan),
        passes=passes,
        on_corrupt=cfg.data.on_corrupt,
        hint=hint,
    )


def positioned_rows(
    filesystem: Any,
    items: List[Dict[str, Any]],
    columns: Sequence[str],
    schema: pa.Schema,
    *,
    seed: int,
    shuffle_block: int,
    plan: Any,
    epoch: int,
    cursor: int,
    last_epoch: int,
    passes: int = 1,
    on_corrupt: str = "error",
    hint: str = "re-run `megaray prepare`",
    rows_per_output: int = 256,
) -> Any:
    """The served rows of epochs ``epoch .. last_epoch`` from position ``cursor`` of ``epoch`` on
    (module docstring), as one Ray Dataset: one ``from_items`` row per shuffle block, read by a
    ``map_batches`` task each (pyarrow; blocks are independent).

    Rows: ``columns`` (typed by ``schema``), ``pass`` int64 (the read pass, for the family's
    crop seed), ``epoch`` int64 and ``index`` int64 (served position in the epoch), in served
    order, in output blocks of at most ``rows_per_output`` rows. Apply the family's map and the
    micro-batch blocks with :func:`map_positioned`.

    Args:
        filesystem: of the items' paths; items: :func:`megaray.data.shards.row_groups` (with
            ``rows``), the split in file order. plan: the split's
            :class:`~megaray.data.order.BatchPlan` (``samples`` = ``passes x`` its rows).
        cursor: served positions of ``epoch`` already trained on, a multiple of
            ``plan.global_batch`` (``>= plan.served``: start at the next epoch).
        on_corrupt: ``"error"`` (a DataError naming the row group, raised to the consumer) or
            ``"skip"`` (filled from its block, module docstring). hint: the prepare command.

    Raises:
        DataError: no items; a bad ``on_corrupt``; fewer rows than ``plan.served``.
        ValueError: ``cursor`` not a multiple of the global batch.
    """
    import ray

    if on_corrupt not in shard_io.ON_CORRUPT:
        raise DataError(f"data.on_corrupt must be one of {', '.join(shard_io.ON_CORRUPT)}, got {on_corrupt!r}")
    if not items:
        raise DataError("no row groups to read (the shards hold no rows)")
    o = EpochOrder.of(plan, seed, capped_block(shuffle_block, items), passes)
    _, blocks = _stream_blocks([int(it["rows"]) for it in items], o, epoch, cursor, last_epoch)
    keys = ("path", "display", "row_group", "rows")
    kw = dict(
        filesystem=filesystem,
        items=[{k: it[k] for k in keys} for it in items],
        columns=list(columns),
        schema=schema,
        order=o,
        on_corrupt=on_corrupt,
        hint=hint,
        rows_per_output=int(rows_per_output),
    )
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    out = ds.map_batches(_read_block, batch_size=1, batch_format="pyarrow", fn_kwargs=kw)
    out.context.raise_original_map_exception = True  # a DataError reaches the run as itself
    return out


def _read_block(
    batch: pa.Table,
    *,
    filesystem: Any,
    items: List[Dict[str, Any]],
    columns: List[str],
    schema: pa.Schema,
    order: EpochOrder,
    on_corrupt: str,
    hint: str,
    rows_per_output: int,
) -> Iterator[pa.Table]:
    """``map_batches`` function (a Ray task): one block dict (:func:`_stream_blocks`) -> its kept
    served rows (``columns``, ``pass``, ``epoch``, ``index``), in tables of ``rows_per_output``."""
    b = batch.to_pylist()[0]
    with_pass = schema.append(pa.field("pass", pa.int64()))
    tables: List[Optional[pa.Table]] = []
    for i, p in zip(b["pieces"], b["passes"]):
        t = shard_io.read_row_group(filesystem, items[i], columns, on_corrupt, hint)
        if t is not None:
            t = t.select(columns)
            t = t.cast(schema) if t.schema != schema else t
            t = t.append_column("pass", pa.array(np.full(t.num_rows, int(p), np.int64)))
        tables.append(t)
    if any(t is None for t in tables):
        tables = _fill(tables, [items[i] for i in b["pieces"]], b)
    table = pa.concat_tables([t.cast(with_pass) for t in tables])
    perm = block_permutation(order, b["epoch"], b["block"], table.num_rows)
    keep = perm[b["first"] - b["start"] : b["stop"] - b["start"]]
    out = table.take(pa.array(keep))
    out = out.append_column("epoch", pa.array(np.full(out.num_rows, b["epoch"], np.int64)))
    out = out.append_column("index", pa.array(np.arange(b["first"], b["stop"], dtype=np.int64)))
    for s in range(0, out.num_rows, rows_per_output):
        yield out.slice(s, rows_per_output)


def _fill(tables: List[Optional[pa.Table]], items: List[Dict[str, Any]], b: Dict[str, Any]) -> List[pa.Table]:
    """Skipped (corrupt) row groups of a block -> as many rows of the block's readable ones, cycled."""
    good = [t for t in tables if t is not None]
    names = ", ".join(f"{it['display']} row group {it['row_group']}" for it, t in zip(items, tables) if t is None)
    if not good:
        raise DataError(
            f"epoch {b['epoch']} shuffle block {b['block']}: no row group could be read ({names}); "
            "with data.on_corrupt=skip a block needs one readable row group to fill the others from: "
            "re-prepare the data"
        )
    pool = pa.concat_tables(good)
    log.warning(
        "filled %s from the other rows of epoch %d shuffle block %d [data.on_corrupt=skip]",
        names,
        b["epoch"],
        b["block"],
    )
    out, used = [], 0
    for it, t in zip(items, tables):
        if t is None:
            n = int(it["rows"])
            t, used = pool.take(pa.array((used + np.arange(n)) % pool.num_rows)), used + n
        out.append(t)
    return out


def _keep_position(
    batch: Dict[str, np.ndarray], *, fn: Callable[..., Dict[str, np.ndarray]], fn_kwargs: Dict[str, Any]
) -> Dict[str, np.ndarray]:
    out = dict(fn(batch, **fn_kwargs))
    out["epoch"] = np.asarray(batch["epoch"], np.int64)
    out["index"] = np.asarray(batch["index"], np.int64)
    return out


def map_positioned(
    ds: Any,
    fn: Callable[..., Dict[str, np.ndarray]],
    micro_batch: int,
    *,
    fn_kwargs: Optional[Dict[str, Any]] = None,
    batch_size: int = 64,
) -> Any:
    """``fn`` (a row-wise numpy ``map_batches`` function: ``n`` rows in, the same ``n`` rows out,
    e.g. a crop) over a positioned stream, keeping its ``epoch`` and ``index`` columns, in blocks
    of exactly ``micro_batch`` rows (``repartition(strict=True)``: what ``streaming_split(world,
    equal=True)`` deals round robin)."""
    out = ds.map_batches(
        _keep_position,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"fn": fn, "fn_kwargs": dict(fn_kwargs or {})},
    )
    return out.repartition(target_num_rows_per_block=micro_batch, strict=True)


# -- rows in memory -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _memory_order(n: int, o: EpochOrder, epoch: int) -> np.ndarray:
    return served_rows([1] * n, o, epoch)[0]


def _gather(batch: pa.Table, *, columns: Any, n: int, order: EpochOrder) -> Dict[str, np.ndarray]:
    """``map_batches`` function: one ``{"epoch", "lo", "hi"}`` range -> those served rows."""
    import ray

    b = batch.to_pylist()[0]
    cols = ray.get(columns) if isinstance(columns, ray.ObjectRef) else columns
    ids = _memory_order(n, order, b["epoch"])[b["lo"] : b["hi"]]
    out = {k: np.asarray(v)[ids] for k, v in cols.items()}
    out["epoch"] = np.full(len(ids), b["epoch"], np.int64)
    out["index"] = np.arange(b["lo"], b["hi"], dtype=np.int64)
    return out


def positioned_table(
    columns: Mapping[str, np.ndarray],
    *,
    seed: int,
    shuffle_block: int,
    plan: Any,
    epoch: int,
    cursor: int,
    last_epoch: int,
    rows_per_output: int = 1024,
) -> Any:
    """The positioned stream (module docstring) over rows held in memory: ``columns`` of equal
    length ``n`` (e.g. SFT's packed windows ``(n, T)``), each row its own piece (so each epoch
    is a permutation of all rows, then permuted inside blocks; one pass). The columns go to the
    object store once; ``from_items`` holds ``(epoch, lo, hi)`` ranges of ``rows_per_output``
    positions. Rows: ``columns`` plus ``epoch`` and ``index``, in blocks of ``plan.micro_batch``.

    Raises:
        DataError: fewer than ``plan.served`` rows. ValueError: a bad ``cursor``.
    """
    import ray

    n = len(next(iter(columns.values())))
    o = EpochOrder.of(plan, seed, shuffle_block)
    if n < o.served:
        raise DataError(f"{n} rows in memory, fewer than the {o.served} an epoch serves")
    if cursor < 0 or cursor % o.global_batch:
        raise ValueError(f"cursor {cursor} is not a multiple of the global batch {o.global_batch}")
    if cursor >= o.served:
        epoch, cursor = epoch + 1, 0
    ranges = [
        {"epoch": e, "lo": lo, "hi": min(lo + rows_per_output, o.served)}
        for e in range(epoch, max(epoch, last_epoch) + 1)
        for lo in range(cursor if e == epoch else 0, o.served, rows_per_output)
    ]
    ref = ray.put({k: np.asarray(v) for k, v in columns.items()})
    ds = ray.data.from_items(ranges, override_num_blocks=len(ranges))
    out = ds.map_batches(_gather, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": ref, "n": n, "order": o})
    return out.repartition(target_num_rows_per_block=plan.micro_batch, strict=True)
