"""The positioned train stream (megaray/data/text/stream.py) without Ray: a stream resumed at any
micro-batch serves exactly the rows an uninterrupted stream serves from there, reading only from
the row group that holds its chunk's first token."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from megaray.data.text.stream import StreamPacker, StreamSpec, chunk_windows, stream_items


def _corpus(seed=0, groups=9):
    """Row groups of documents (token lists ending in EOS=0), with the footer-style token count."""
    rng = np.random.default_rng(seed)
    next_token = 1
    items = []
    for g in range(groups):
        docs = []
        for _ in range(int(rng.integers(2, 6))):
            n = int(rng.integers(0, 14))  # empty documents too
            docs.append(list(range(next_token, next_token + n)) + [0])
            next_token += n
        items.append({"row_group": g, "docs": docs, "values": sum(len(d) for d in docs)})
    return items


def _serve(items, spec, epoch, batch, last_epoch, pack_rows=3):
    """Feed a StreamPacker the rows the Ray pipeline would read, ``pack_rows`` rows per call."""
    read, args = stream_items(items, spec, epoch, batch, last_epoch, spec.chunk > 0)
    packer = StreamPacker(spec, **args)
    rows = [(d, it["pass"]) for it in read for d in it["docs"]]
    out = []
    for i in range(0, len(rows), pack_rows):
        part = rows[i: i + pack_rows]
        table = pa.table({"tokens": pa.array([d for d, _ in part], pa.list_(pa.int64())),
                          "pass": pa.array([p for _, p in part], pa.int64())})
        got = packer(table)
        out += [(int(e), int(k), tuple(x)) for e, k, x in zip(got["epoch"], got["index"], got["input_ids"])]
    return out, args


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_a_resumed_stream_serves_exactly_the_rest_of_the_uninterrupted_one(shuffle_buffer):
    items = _corpus()
    W, B, T = 2, 2, 5
    tokens = sum(it["values"] for it in items)
    bpe = (tokens // (T + 1)) // (W * B)
    spec = StreamSpec(block_size=T, world=W, batch_size=B, batches_per_epoch=bpe, seed=3,
                      chunk=chunk_windows(shuffle_buffer, W, B))
    full, _ = _serve(items, spec, 0, 0, last_epoch=2)
    # every epoch serves exactly batches_per_epoch * W * B windows, in served positions 0..n-1
    for e in range(3):
        assert [k for ep, k, _ in full if ep == e] == list(range(spec.per_epoch))
    if not shuffle_buffer:  # unshuffled: windows are the epoch's token stream, cut in order
        stream = np.concatenate([np.array(d) for it in items for d in it["docs"]])
        first = [x for ep, _, x in full if ep == 0]
        assert first == [tuple(stream[j * (T + 1): j * (T + 1) + T]) for j in range(spec.per_epoch)]
    else:  # shuffled: epochs differ in order, and each chunk holds the same windows as unshuffled
        assert [x for ep, _, x in full if ep == 0] != [x for ep, _, x in full if ep == 1]
    for epoch in range(3):
        for batch in range(bpe):
            resumed, args = _serve(items, spec, epoch, batch, last_epoch=2)
            expect = [r for r in full if (r[0], r[1]) >= (epoch, batch * W * B)]
            assert resumed == expect, (epoch, batch)
            # constant work: the packer re-cuts at most one chunk of windows before the position
            assert args["drop_windows"] < (spec.chunk or W * B)


def test_rows_deal_round_robin_so_each_rank_resumes_at_its_next_batch():
    """Rank r's k-th batch of an epoch is served windows [(k*W + r)*B, +B): what the loop checks."""
    items = _corpus(1, groups=12)
    W, B, T = 3, 2, 4
    bpe = (sum(it["values"] for it in items) // (T + 1)) // (W * B)
    spec = StreamSpec(block_size=T, world=W, batch_size=B, batches_per_epoch=bpe, seed=0, chunk=chunk_windows(8, W, B))
    full, _ = _serve(items, spec, 0, 0, last_epoch=0)
    blocks = [full[i: i + B] for i in range(0, len(full), B)]  # repartition(B, strict) blocks
    for n, block in enumerate(blocks):
        rank, k = n % W, n // W
        assert [idx for _, idx, _ in block] == list(range((k * W + rank) * B, (k * W + rank) * B + B))


def test_chunk_is_a_multiple_of_the_global_batch():
    assert chunk_windows(0, 4, 8) == 0
    assert chunk_windows(256, 2, 8) == 512  # 256 rows per rank, as the local buffer held
    assert chunk_windows(5, 2, 2) % 4 == 0
