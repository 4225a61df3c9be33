"""Elastic determinism: every family's train split is one sample order per (seed, epoch), whatever
the world size (megaray/data/order.py, megaray/data/rows.py).

A positioned stream (``Task.train_stream``) with global batch G = 12 and micro-batch B = 2, dealt
round robin by micro-batch as ``streaming_split(world, equal=True)`` deals its 2-row blocks, gives
the same global batches at world sizes 1, 2 and 3; every position of an epoch is served once; a
stream started at a cursor serves exactly the tail of the uninterrupted one. Text, audio and image
corpora (the session fixtures), plus the multimodal mixture, the mel DiT and SFT's in-memory
windows; one case goes through a real ``streaming_split``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from megaray.data import order, rows
from megaray.data.order import BatchPlan
from megaray.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
G, B = 12, 2
CONTENT = {
    "text": "input_ids",
    "audio": "audio",
    "image": "image",
    "mel": "mel",
    "multimodal": "tokens",
    "sft": "input_ids",
}


# ----------------------------------------------------------------------------- arithmetic, no Ray
def test_batch_plan_arithmetic_and_the_served_order():
    plan = BatchPlan(samples=100, global_batch=G, micro_batch=B)
    assert (plan.steps_per_epoch, plan.served) == (8, 96)
    assert [plan.accum(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert plan.worlds(1, 8) == [1, 2, 3, 6] and plan.micro_batches(3) == 16 and plan.position(24, 2) == 6
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size 12 is not a multiple of data.batch_size 2 x 4 workers;"
        r" world sizes that divide it: \[1, 2, 3, 6\]",
    ):
        plan.accum(4)
    with pytest.raises(ConfigError, match="holds 11 crops, fewer than one global batch of 12"):
        order.train_plan(11, G, B, "data/x", "crops")
    with pytest.raises(ConfigError, match="holds 5 samples, fewer than 3 workers x batch_size 2"):
        order.check_val(5, 3, B, "data/x")
    assert order.global_batch_size(None, 2, 3, 2) == 12 and order.global_batch_size(24, 2, 3, 2) == 24
    assert (order.block_size(40, G), order.block_size(0, G), order.val_batches(50, 3, 2, 8)) == (48, 0, 8)

    sizes = [7, 5, 9, 3, 11, 8, 7]  # rows per row group
    o = rows.EpochOrder.of(plan, seed=3, shuffle_block=20, passes=2)
    ids, passes = rows.served_rows(sizes, o, epoch=0)
    assert len(ids) == plan.served and len(set(zip(ids.tolist(), passes.tolist()))) == plan.served  # each once
    blocks, _, _ = rows.epoch_blocks(sizes, o, 0)
    assert all(b.rows >= o.block for b in blocks[:-1]) and blocks[-1].start + blocks[-1].rows >= plan.served
    for b in blocks:  # a block's served rows are its stream rows, permuted
        stream = np.arange(b.start, min(b.start + b.rows, plan.served))
        assert sorted(np.arange(len(ids))[b.start : b.start + b.rows].tolist()) == stream.tolist()
    assert not np.array_equal(ids, rows.served_rows(sizes, o, epoch=1)[0])  # epochs differ
    unshuffled = rows.EpochOrder.of(plan, seed=3, shuffle_block=0, passes=2)
    ids0, passes0 = rows.served_rows(sizes, unshuffled, 0)
    assert ids0.tolist() == (list(range(50)) * 2)[:96] and passes0.tolist() == ([0] * 50 + [1] * 46)
    with pytest.raises(DataError, match="holds 50 rows in 1 pass"):
        rows.served_rows(sizes, rows.EpochOrder.of(plan, 3, 20, passes=1), 0)


# ----------------------------------------------------------------------------- streams of the tasks
def _cfg(kind, shards, global_batch):
    from megaray.families import load_config

    common = [
        "data.batch_size=2",
        f"train.global_batch_size={global_batch}",
        "scaling.num_workers=[1,3]",
        "data.shuffle_block=40",
        "data.num_val_batches=1",
        "train.max_steps=20",
    ]
    if kind == "text":
        return load_config(
            REPO / "configs" / "gpt_debug.yaml", [f"data.shards={shards}", "model.block_size=1024", *common]
        )
    if kind == "audio":
        return load_config(REPO / "configs" / "vocoder_tiny.yaml", [f"data.shards={shards}", *common])
    if kind == "image":
        return load_config(
            REPO / "configs" / "image_vae_tiny.yaml", [f"data.shards={shards}", "model.perceptual_weight=0", *common]
        )
    if kind == "mel":
        return load_config(
            REPO / "configs" / "mel_dit_tiny.yaml", [f"data.shards={shards}", "model.input_size=[80,32]", *common]
        )
    if kind == "multimodal":
        text, speech, image = shards
        return load_config(
            REPO / "configs" / "multimodal_tiny.yaml",
            [
                f"data.sources=[{{shards: {text}, weight: 2}}, {{shards: {speech}, weight: 1}}, {{shards: {image}, weight: 1}}]",
                *common,
            ],
        )
    return load_config(
        REPO / "configs" / "finetune_tiny.yaml", [f"data.shards={shards}", "model.block_size=64", *common]
    )


def _task(kind, shards, global_batch=G):
    from megaray.families import task_class

    cfg = _cfg(kind, shards, global_batch)
    task = task_class(cfg.model.family, cfg.train.task)(cfg)
    task.datasets()  # fills task.info.plan
    plan = task.info.plan
    assert (plan.global_batch, plan.micro_batch) == (global_batch, B)
    task.cfg.train.max_steps = plan.steps_per_epoch + 1  # the streams hold epochs 0 and 1
    return task, plan


def _blocks(ds, limit=None):
    """The stream's blocks as lists of ``(epoch, index, content fingerprint)``."""
    ds.context.execution_options.preserve_order = True
    out = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        content = batch[CONTENT_KEY[0]]
        out.append(
            [
                (int(e), int(i), hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=8).hexdigest())
                for e, i, x in zip(batch["epoch"], batch["index"], content)
            ]
        )
        if limit is not None and len(out) >= limit:
            break
    return out


CONTENT_KEY = [""]


def _check_stream(task, plan, kind, full_epochs=True, cursor=2 * G):
    G = plan.global_batch
    CONTENT_KEY[0] = CONTENT[kind]
    limit = None if full_epochs else 5 * G // B
    full = _blocks(task.train_stream(0, 0, plan), limit)
    assert all(len(b) == B for b in full)  # blocks of one micro-batch: what streaming_split deals
    flat = [r for b in full for r in b]
    if full_epochs:  # every position of each epoch exactly once, in order
        for e in (0, 1):
            assert [i for ep, i, _ in flat if ep == e] == list(range(plan.served)), e
        assert [c for ep, _, c in flat if ep == 0] != [c for ep, _, c in flat if ep == 1]
    # round robin by micro-batch at world 1, 2, 3: the same global batches
    steps = len(flat) // G
    batches = {}
    worlds = plan.worlds(1, 3)
    for world in worlds:
        accum, ranks = plan.accum(world), [full[r::world] for r in range(world)]
        batches[world] = [
            sorted(r for rank in ranks for blk in rank[s * accum : (s + 1) * accum] for r in blk) for s in range(steps)
        ]
    assert all(batches[w] == batches[1] for w in worlds) and len(worlds) > 1
    for s, batch in enumerate(batches[1]):
        e, first = divmod(s * G, plan.served)
        assert [(ep, i) for ep, i, _ in batch] == [(e, first + j) for j in range(G)]
    # resumed at a cursor: exactly the tail of the uninterrupted stream
    tail = [r for b in _blocks(task.train_stream(0, cursor, plan), None if full_epochs else 3 * G // B) for r in b]
    expect = [r for r in flat if (r[0], r[1]) >= (0, cursor)]
    assert tail == expect[: len(tail)] and (not full_epochs or len(tail) == len(expect))
    return flat


def test_text_stream_same_global_batches_at_any_world_size(ray_cluster, text_shards, tmp_path):
    task, plan = _task("text", text_shards)
    _check_stream(task, plan, "text")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_audio_crops_same_global_batches_at_any_world_size(ray_cluster, speech_shards, tmp_path):
    task, plan = _task("audio", speech_shards)
    assert plan.samples == task.info.crop_passes * task.info.train_clips  # passes: max_steps x G / clips, capped
    _check_stream(task, plan, "audio")


def test_image_crops_same_global_batches_and_a_real_streaming_split(ray_cluster, image_shards, tmp_path):
    task, plan = _task("image", image_shards)
    _check_stream(task, plan, "image")
    # the served rows are those the pure-numpy order names (row ids in file order, pass)
    filesystem, items, schema, _ = rows.split_items(image_shards, task.info.manifest, "train", ["name"])
    o = rows.EpochOrder.of(plan, task.cfg.train.seed, task.cfg.data.shuffle_block, task.info.passes)
    ds = rows.positioned_rows(
        filesystem,
        items,
        ["name"],
        schema,
        seed=o.seed,
        shuffle_block=task.cfg.data.shuffle_block,
        plan=plan,
        epoch=1,
        cursor=G,
        last_epoch=1,
        passes=task.info.passes,
    )
    ds.context.execution_options.preserve_order = True
    got = ds.take_all()
    import pyarrow.parquet as pq

    names = [
        n
        for it in items
        for n in pq.ParquetFile(it["path"]).read_row_group(it["row_group"], ["name"]).column("name").to_pylist()
    ]
    ids, passes = rows.served_rows([it["rows"] for it in items], o, 1)
    assert [(r["name"], r["pass"], r["index"]) for r in got] == [
        (names[i], p, k) for k, (i, p) in enumerate(zip(ids, passes)) if k >= G
    ]
    # a real streaming_split(3, equal=True): rank r's k-th micro-batch is positions [(k*3 + r)*B, +B)
    ds = task.train_stream(0, 0, plan)
    ds.context.execution_options.preserve_order = True
    splits, seen = ds.streaming_split(3, equal=True), {}

    def consume(r):
        seen[r] = [
            (b["epoch"].tolist(), b["index"].tolist())
            for b in splits[r].iter_batches(batch_size=B, batch_format="numpy")
        ]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    for r in range(3):
        for k, (epochs, index) in enumerate(seen[r]):
            e, local = divmod(k, plan.micro_batches(3))
            assert epochs == [e] * B and index == [(local * 3 + r) * B + j for j in range(B)], (r, k)
        assert len(seen[r]) == 2 * plan.micro_batches(3)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_mixture_mel_dit_and_sft_streams_are_positioned(
    ray_cluster, text_shards, speech_shards, image_shards, tmp_path
):
    """The other families' streams: the first global batches, and a resume at a cursor."""
    task, plan = _task("multimodal", (text_shards, speech_shards, image_shards))
    _check_stream(task, plan, "multimodal", full_epochs=False)
    task, plan = _task("mel", speech_shards, global_batch=6)  # 11 clips, one crop each (from the start)
    _check_stream(task, plan, "mel", cursor=6)
    from megaray.data.sft import prepare_sft

    src = tmp_path / "chat.jsonl"
    src.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus {i % 7}?", "completion": f"{i + i % 7}."}) + "\n"
            for i in range(160)
        )
    )
    prepare_sft([str(src)], str(tmp_path / "sft"), text_shards, max_tokens=65, val_fraction=0.2, verbose=False)
    task, plan = _task("sft", str(tmp_path / "sft"))
    _check_stream(task, plan, "sft")


def test_positioned_rows_name_or_fill_a_corrupt_row_group(ray_cluster, tmp_path):
    """Six row groups of 10 rows, one with corrupt data pages: ``on_corrupt="error"`` names it;
    ``"skip"`` still serves every position (the lost rows are filled from the rest of their block)
    and every other position holds the row the pure-numpy order names."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    path = tmp_path / "part-00000.parquet"
    rng = np.random.default_rng(0)
    table = pa.table({"payload": [rng.bytes(300) for _ in range(60)], "id": np.arange(60, dtype=np.int64)})
    pq.write_table(table, path, row_group_size=10, compression="none", use_dictionary=False, write_page_checksum=True)
    col = pq.ParquetFile(path).metadata.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    mid = col.data_page_offset + col.total_compressed_size // 2
    raw[mid : mid + 32] = bytes(b ^ 0xFF for b in raw[mid : mid + 32])
    path.write_bytes(bytes(raw))

    from megaray.data.shards import row_groups

    fs = pafs.LocalFileSystem()
    items = row_groups(fs, [str(path)], ["x/part-00000.parquet"], "re-run it")
    plan = BatchPlan(60, G, B)
    kw = dict(seed=1, shuffle_block=20, plan=plan, epoch=0, cursor=0, last_epoch=0)
    ds = rows.positioned_rows(fs, items, ["payload", "id"], table.schema, **kw)
    with pytest.raises(DataError, match=r"x/part-00000\.parquet: row group 2 is corrupt"):
        ds.take_all()
    ds = rows.positioned_rows(fs, items, ["payload", "id"], table.schema, on_corrupt="skip", **kw)
    ds.context.execution_options.preserve_order = True
    got = ds.take_all()
    o = rows.EpochOrder.of(plan, 1, 20)
    want, _ = rows.served_rows([10] * 6, o, 0)
    assert [r["index"] for r in got] == list(range(60))
    lost = {i for i, w in enumerate(want) if 20 <= w < 30}
    assert len(lost) == 10 and all(r["id"] == w for i, (r, w) in enumerate(zip(got, want)) if i not in lost)
    blocks, item, _ = rows.epoch_blocks([10] * 6, o, 0)
    (block,) = [b for b in blocks if 2 in item[b.lo : b.hi]]
    others = {g * 10 + j for g in item[block.lo : block.hi] if g != 2 for j in range(10)}
    assert {got[i]["id"] for i in lost} <= others and len(others) >= 10  # filled from the same block


def test_a_shuffle_block_of_large_rows_is_capped_by_bytes():
    """data.shuffle_block counts samples; rows of clips or images cap it at BLOCK_BYTES a block."""
    from megaray.data.rows import BLOCK_BYTES, capped_block

    clips = [{"rows": 50, "bytes": 50 * 256 * 1024}, {"rows": 50, "bytes": 50 * 256 * 1024}]  # 256 KiB a row
    assert capped_block(65536, clips) == BLOCK_BYTES // (256 * 1024) == 2048
    assert capped_block(65536, [{"rows": 100, "bytes": 1000}]) == 65536  # small rows: unchanged
    assert capped_block(0, clips) == 0  # no shuffling stays no shuffling
    assert capped_block(64, [{"rows": 3}]) == 64  # no sizes known: unchanged
