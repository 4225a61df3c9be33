"""The positioned train stream: one Ray Data execution for every epoch, resumed in constant time.

:func:`text_stream` yields the windows of several epochs as one stream, starting at a given
``(epoch, batch)`` position; the loop (:mod:`megaray.train.loop`) reads it with one
``iter_torch_batches`` for the whole run, so no epoch boundary restarts the pipeline, and a
resumed run starts reading at its position instead of replaying the batches it trained on.

How the position maps to bytes. Epoch ``e`` is the token stream of the split's row groups in a
fixed order (a permutation seeded by ``(seed, e)`` when shuffling), cut into windows of
``block_size + 1`` tokens from the epoch's first token; so source window ``j`` of epoch ``e``
starts at token ``j * (block_size + 1)``, and the footers' per-row-group token counts say which
row group holds it (:func:`start_at`). Each epoch serves ``per_epoch`` windows (whole global
batches: :class:`megaray.data.order.BatchPlan`). With shuffling the windows are permuted inside
aligned blocks of ``chunk`` windows (``data.shuffle_block`` rounded to whole global batches) by a
generator seeded with ``(seed, epoch, block index)``: a resume re-packs at most one block, never
the epoch, and nothing in the order depends on the world size.

How the position maps to ranks. :func:`megaray.data.text.text_stream` repartitions the
packer's output into blocks of exactly one micro-batch, and ``streaming_split(world,
equal=True)`` hands equal blocks to the rank with the fewest rows so far, i.e. round robin
under ``preserve_order``: rank ``r``'s ``k``-th micro-batch of an epoch is served windows
``[(k * world + r) * B, ... + B)``, so the ``world * B * accum`` windows of one optimizer step
are the same global batch at any world size (:mod:`megaray.data.order`). Every row carries
``epoch`` and ``index`` (its served position in the epoch), so the loop checks that the stream
starts where its checkpoint says (:func:`megaray.train.loop.positioned_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class StreamSpec:
    """What fixes the served order of a train stream (nothing here depends on the world size).

    Attributes:
        block_size: tokens per training sequence (windows hold ``block_size + 1``).
        global_batch: windows per optimizer step (``train.global_batch_size``).
        per_epoch: windows served per epoch (whole global batches; the rest of the tokens are
            dropped): :attr:`megaray.data.order.BatchPlan.served`.
        seed: seeds the per-epoch row-group order and the in-block permutations.
        chunk: windows per shuffle block (a multiple of ``global_batch``); 0 = no shuffling
            (windows in stream order).
    """

    block_size: int
    global_batch: int
    per_epoch: int
    seed: int = 0
    chunk: int = 0


def epoch_order(n_items: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    """Row-group order of ``epoch``: a permutation seeded by ``(seed, epoch)``, or file order."""
    if not shuffle:
        return list(range(n_items))
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_items).tolist()


def start_at(tokens: List[int], spec: StreamSpec, cursor: int) -> Tuple[int, int, int, int]:
    """Where a stream resumed at ``cursor`` (windows of this epoch already served, all ranks
    together) starts reading, for an epoch whose row groups (in that epoch's order) hold ``tokens``.

    Returns ``(item, skip_tokens, first_window, drop_windows)``: the first row group to read,
    the tokens of it to skip, the source window the packer starts at (a block start) and how
    many windows of that block were already served (dropped after the block is permuted)."""
    chunk = spec.chunk or spec.global_batch
    first = (cursor // chunk) * chunk
    offset = first * (spec.block_size + 1)
    ends = np.cumsum(tokens)
    item = int(np.searchsorted(ends, offset, side="right"))
    before = int(ends[item - 1]) if item > 0 else 0
    return item, offset - before, first, cursor - first


class StreamPacker:
    """Ray Data callable class: rows ``{"tokens": list<int>, "pass": epoch}`` in stream order ->
    windows ``{"input_ids", "targets": (n, block_size) int64, "epoch", "index": (n,) int64}``.

    Packs each epoch from its first token (the carry is reset when ``pass`` changes), serves at
    most :attr:`StreamSpec.per_epoch` windows of it, permutes them inside aligned chunks when
    ``spec.chunk`` is set, and drops the first ``drop_windows`` served windows of the stream (a
    resume's already-trained part of its first chunk). Must run its batches in arrival order
    (``PACKER_ACTOR_OPTIONS``).

    Args:
        spec: the stream's order (:class:`StreamSpec`).
        first_epoch: the epoch of the first row; skip_tokens: tokens of the first row group
            before the start; first_window: the source window the start is; drop_windows:
            served windows to drop at the start (:func:`start_at`).
    """

    def __init__(
        self, spec: StreamSpec, first_epoch: int, skip_tokens: int = 0, first_window: int = 0, drop_windows: int = 0
    ):
        self.spec, self.window = spec, spec.block_size + 1
        self.epoch, self.skip, self.drop = first_epoch, skip_tokens, drop_windows
        self.carry = np.empty(0, np.int32)  # pending tokens as int32: a block of 2**16 1k-token windows is 270 MB
        self.source = first_window  # windows of this epoch cut so far (the next one's index)
        self.pending: List[np.ndarray] = []
        self.pending_start = first_window
        self.out: List[Dict[str, np.ndarray]] = []

    def __call__(self, batch: pa.Table) -> Dict[str, np.ndarray]:
        passes = batch.column("pass").to_numpy()
        col = batch.column("tokens")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        cuts = np.flatnonzero(np.diff(passes)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(passes)]):
            epoch = int(passes[lo])
            if epoch != self.epoch:
                self._new_epoch(epoch)
            values = col.slice(lo, hi - lo).flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            if self.skip:
                k = min(self.skip, len(values))
                values, self.skip = values[k:], self.skip - k
            self._cut(values)
        out, self.out = self.out, []
        if not out:
            return _empty(self.spec.block_size)
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def _new_epoch(self, epoch: int) -> None:
        # an epoch that ended short (data.on_corrupt=skip dropped row groups): serve its whole
        # global batches, so every rank still gets the same number of rows and the next epoch
        # starts on rank 0
        rows = np.concatenate(self.pending) if self.pending else np.empty((0, self.window), np.int32)
        whole = (len(rows) // self.spec.global_batch) * self.spec.global_batch
        if whole:
            self._emit(rows[:whole], self.pending_start)
        self.epoch, self.carry, self.source, self.pending, self.pending_start = epoch, np.empty(0, np.int32), 0, [], 0

    def _cut(self, values: np.ndarray) -> None:
        stream = np.concatenate([self.carry, values])
        n = len(stream) // self.window
        self.carry = stream[n * self.window :].copy()
        take = max(0, min(n, self.spec.per_epoch - self.source))  # the epoch's tail is not served
        if not take:
            return
        self.pending.append(stream[: take * self.window].reshape(take, self.window))
        self.source += take
        rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        chunk, pos = self.spec.chunk or self.spec.global_batch, 0
        while True:  # serve every completed chunk (the epoch's last one may be shorter)
            start = self.pending_start
            need = min((start // chunk + 1) * chunk, self.spec.per_epoch) - start
            if need <= 0 or len(rows) - pos < need:
                break
            self._emit(rows[pos : pos + need], start)
            pos, self.pending_start = pos + need, start + need
        self.pending = [rows[pos:]] if pos < len(rows) else []

    def _emit(self, rows: np.ndarray, start: int) -> None:
        if self.spec.chunk:
            perm = np.random.default_rng([self.spec.seed, self.epoch, start // self.spec.chunk]).permutation(len(rows))
            rows = rows[perm]
        index = np.arange(start, start + len(rows), dtype=np.int64)
        if self.drop:
            k = min(self.drop, len(rows))
            rows, index, self.drop = rows[k:], index[k:], self.drop - k
        if len(rows):
            self.out.append(
                {
                    "input_ids": rows[:, :-1].astype(np.int64),
                    "targets": rows[:, 1:].astype(np.int64),
                    "epoch": np.full(len(rows), self.epoch, np.int64),
                    "index": index,
                }
            )


def _empty(block_size: int) -> Dict[str, np.ndarray]:
    z = np.empty((0, block_size), np.int64)
    return {"input_ids": z, "targets": z.copy(), "epoch": np.empty(0, np.int64), "index": np.empty(0, np.int64)}


def stream_items(
    items: List[Dict[str, Any]], spec: StreamSpec, epoch: int, cursor: int, last_epoch: int, shuffle: bool
) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Row-group read items of epochs ``epoch .. last_epoch`` (each with its ``pass``) starting at
    window ``cursor`` of ``epoch``, and the :class:`StreamPacker` arguments for that start."""
    order = [items[i] for i in epoch_order(len(items), spec.seed, epoch, shuffle)]
    first, skip, first_window, drop = start_at([int(it["values"]) for it in order], spec, cursor)
    out = [dict(it, **{"pass": epoch}) for it in order[first:]]
    for e in range(epoch + 1, last_epoch + 1):
        out += [dict(items[i], **{"pass": e}) for i in epoch_order(len(items), spec.seed, e, shuffle)]
    return out, {"first_epoch": epoch, "skip_tokens": skip, "first_window": first_window, "drop_windows": drop}
