"""The positioned train stream (megaray/data/text/stream.py) without Ray: a stream resumed at any
global cursor serves exactly the rows an uninterrupted stream serves from there, reading only from
the row group that holds its shuffle block's first token; nothing in it depends on the world size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from megaray.data.order import BatchPlan, block_size
from megaray.data.text.stream import StreamPacker, StreamSpec, stream_items


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


def _serve(items, spec, epoch, cursor, last_epoch, pack_rows=3):
    """Feed a StreamPacker the rows the Ray pipeline would read, ``pack_rows`` rows per call."""
    read, args = stream_items(items, spec, epoch, cursor, last_epoch, spec.chunk > 0)
    packer = StreamPacker(spec, **args)
    rows = [(d, it["pass"]) for it in read for d in it["docs"]]
    out = []
    for i in range(0, len(rows), pack_rows):
        part = rows[i : i + pack_rows]
        table = pa.table(
            {
                "tokens": pa.array([d for d, _ in part], pa.list_(pa.int64())),
                "pass": pa.array([p for _, p in part], pa.int64()),
            }
        )
        got = packer(table)
        out += [(int(e), int(k), tuple(x)) for e, k, x in zip(got["epoch"], got["index"], got["input_ids"])]
    return out, args


def _spec(items, T, G, shuffle_block, seed=3):
    plan = BatchPlan(sum(it["values"] for it in items) // (T + 1), G, 2)
    return StreamSpec(
        block_size=T, global_batch=G, per_epoch=plan.served, seed=seed, chunk=block_size(shuffle_block, G)
    ), plan


@pytest.mark.parametrize("shuffle_block", [0, 5])
def test_a_resumed_stream_serves_exactly_the_rest_of_the_uninterrupted_one(shuffle_block):
    items = _corpus()
    T, G = 5, 4
    spec, plan = _spec(items, T, G, shuffle_block)
    full, _ = _serve(items, spec, 0, 0, last_epoch=2)
    # every epoch serves exactly steps_per_epoch * G windows, in served positions 0..n-1
    for e in range(3):
        assert [k for ep, k, _ in full if ep == e] == list(range(spec.per_epoch))
    if not shuffle_block:  # unshuffled: windows are the epoch's token stream, cut in order
        stream = np.concatenate([np.array(d) for it in items for d in it["docs"]])
        first = [x for ep, _, x in full if ep == 0]
        assert first == [tuple(stream[j * (T + 1) : j * (T + 1) + T]) for j in range(spec.per_epoch)]
    else:  # shuffled: epochs differ in order
        assert [x for ep, _, x in full if ep == 0] != [x for ep, _, x in full if ep == 1]
    for epoch in range(3):
        for step in range(plan.steps_per_epoch):
            resumed, args = _serve(items, spec, epoch, step * G, last_epoch=2)
            expect = [r for r in full if (r[0], r[1]) >= (epoch, step * G)]
            assert resumed == expect, (epoch, step)
            # constant work: the packer re-cuts at most one block of windows before the position
            assert args["drop_windows"] < (spec.chunk or G)


def test_one_shuffle_block_as_large_as_the_epoch_is_a_full_permutation():
    """shuffle_block >= the epoch: every window can land anywhere (no locality left)."""
    items = _corpus(2, groups=12)
    spec, plan = _spec(items, 4, 4, shuffle_block=10_000)
    unshuffled, _ = _serve(items, _spec(items, 4, 4, shuffle_block=0)[0], 0, 0, last_epoch=0)
    shuffled, _ = _serve(items, spec, 0, 0, last_epoch=0)
    source = {x: k for _, k, x in unshuffled}
    moved = [abs(source[x] - k) for _, k, x in shuffled if x in source]
    assert sorted(x for *_, x in shuffled) != [x for *_, x in shuffled]
    assert max(moved) > plan.served // 2  # windows travel across the whole epoch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rows_deal_round_robin_into_the_same_global_batches_at_any_world_size(world):
    """Rank r's k-th micro-batch of an epoch is served windows [(k*W + r)*B, +B), so the W * B *
    accum windows of one optimizer step are positions [s*G, (s+1)*G) whatever W is."""
    items = _corpus(1, groups=12)
    B, G = 2, 12
    spec, plan = _spec(items, 4, G, shuffle_block=8)
    full, _ = _serve(items, spec, 0, 0, last_epoch=0)
    blocks = [full[i : i + B] for i in range(0, len(full), B)]  # repartition(B, strict) blocks
    accum = plan.accum(world)
    steps = {}
    for n, block in enumerate(blocks):
        rank, k = n % world, n // world
        assert [idx for _, idx, _ in block] == list(range((k * world + rank) * B, (k * world + rank) * B + B))
        steps.setdefault(k // accum, []).extend(x for *_, x in block)
    for s, windows in steps.items():
        assert sorted(windows) == sorted(x for _, idx, x in full if s * G <= idx < (s + 1) * G)
