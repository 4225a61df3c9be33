"""The shared data core on real shards: corrupt data pages (named or skipped), weighted mixtures
of text shard sets (composition, determinism, one tokenizer), the atomic publish and manifests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megaray import fs
from megaray.data import mixture
from megaray.data.manifest import read_manifest
from megaray.data.text import load_manifest, num_windows, prepare_text, text_datasets
from megaray.errors import DataError

BLOCK = 16


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """Two real text shard sets with one tokenizer: stdlib docstrings, and a folder of other
    stdlib docstrings (different documents) tokenized with the first set's tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    a = root / "a"
    prepare_text(
        ["stdlib"],
        str(a),
        vocab_size=400,
        stdlib_max_docs=300,
        val_fraction=0.1,
        rows_per_group=32,
        tokens_per_shard=8000,
        progress=False,
        verbose=False,
    )
    from megaray.data.stdlib import iter_stdlib_docstrings

    src = root / "src"
    src.mkdir()
    docs = [t for _, t in iter_stdlib_docstrings(min_chars=200)][1000:1080]
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    b = root / "b"
    prepare_text(
        [str(src)],
        str(b),
        tokenizer=str(a / "tokenizer.json"),
        val_fraction=0.2,
        rows_per_group=16,
        progress=False,
        verbose=False,
    )
    c = root / "c"  # same documents, its own tokenizer
    prepare_text([str(src)], str(c), vocab_size=300, val_fraction=0.2, progress=False, verbose=False)
    return {"a": str(a), "b": str(b), "c": str(c), "root": root}


def _ordered(fn):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # as megaray.train.launch sets it
    try:
        return fn()
    finally:
        ctx.execution_options.preserve_order = old


def _windows(ds) -> np.ndarray:
    return np.concatenate([b["input_ids"] for b in ds.iter_batches(batch_size=256, batch_format="numpy")])


def _rows(shards: str, split: str, skip=None):
    rows = []
    for s in load_manifest(shards)["splits"][split]["shards"]:
        pf = pq.ParquetFile(Path(shards) / s["path"])
        for i in range(pf.num_row_groups):
            if skip != (s["path"], i):
                rows += pf.read_row_group(i).column("tokens").to_pylist()
    return rows


def _corrupt_data_pages(path: Path, row_group: int) -> None:
    """Flip bytes inside one row group's column chunk; the footer stays intact."""
    col = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    raw = bytearray(path.read_bytes())
    mid = col.data_page_offset + col.total_compressed_size // 2
    for i in range(mid, mid + 32):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert pq.ParquetFile(path).metadata.num_rows > 0  # the footer still parses: the up-front check passes


def test_corrupt_row_group_is_named_or_skipped(ray_local, shard_sets, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shard_sets["a"], bad)
    entry = load_manifest(str(bad))["splits"]["train"]["shards"][0]
    assert entry["row_groups"] >= 2
    _corrupt_data_pages(bad / entry["path"], 1)

    ds = _ordered(lambda: text_datasets(str(bad), block_size=BLOCK)["train"])  # footers pass
    with pytest.raises(DataError, match=r"train/part-00000\.parquet: row group 1 is corrupt .*on_corrupt=skip"):
        _windows(ds)

    ds = _ordered(lambda: text_datasets(str(bad), block_size=BLOCK, on_corrupt="skip")["train"])
    got = _windows(ds)
    stream = np.concatenate([np.array(r, np.int64) for r in _rows(shard_sets["a"], "train", skip=(entry["path"], 1))])
    n = len(stream) // (BLOCK + 1)
    assert len(got) == n < num_windows(str(bad), BLOCK)  # exactly the other row groups' windows
    np.testing.assert_array_equal(got, stream[: n * (BLOCK + 1)].reshape(n, BLOCK + 1)[:, :-1])


def test_mixture_follows_weights_and_repeats_exactly(ray_local, shard_sets):
    a, b = shard_sets["a"], shard_sets["b"]
    sources = [(a, 1.0), (b, 3.0)]
    ta, tb = (load_manifest(x)["splits"]["train"]["tokens"] for x in (a, b))
    want_a, want_b = mixture.plan([ta, tb], [1.0, 3.0])
    assert want_b > tb  # b is smaller than its share: it must repeat
    first = _ordered(lambda: _windows(text_datasets(sources, block_size=BLOCK, seed=7)["train"]))
    again = _ordered(lambda: _windows(text_datasets(sources, block_size=BLOCK, seed=7)["train"]))
    np.testing.assert_array_equal(first, again)  # same (seed, epoch) -> same rows in the same order
    assert len(first) == num_windows(sources, BLOCK, seed=7)
    # composition: tokens taken from each source, in whole row groups, reach its target
    from megaray.data.text.datasets import _plan

    plan = _plan(sources, "train", 7)
    taken = {x: sum(it["values"] for _, it in plan.items if it["display"].startswith(x)) for x in (a, b)}
    rg_max = max(it["values"] for _, it in plan.items)
    assert want_a <= taken[a] < want_a + rg_max and want_b <= taken[b] < want_b + rg_max
    assert abs(taken[b] / (taken[a] + taken[b]) - 0.75) < 0.05


def test_mixture_needs_one_tokenizer(shard_sets):
    with pytest.raises(DataError, match="different tokenizers.*--tokenizer"):
        text_datasets([(shard_sets["a"], 1.0), (shard_sets["c"], 1.0)], block_size=BLOCK)


def test_mixture_plan_and_interleave():
    # N = 15, two equal weights: each source round(7.5) = 8 units (a truncated, b repeated)
    assert mixture.plan([10, 5], [1.0, 1.0]) == [8, 8]
    assert mixture.plan([10, 5], [1.0, 4.0]) == [3, 12]
    assert mixture.interleave([2, 1], 0) == [(0, 0), (1, 0), (0, 1)]
    with pytest.raises(DataError, match="weight must be > 0"):
        mixture.plan([1, 2], [1.0, 0.0])


def test_publish_replaces_whole_folder_and_survives_a_crash(tmp_path):
    out = tmp_path / "out"
    with fs.staged_dir(str(out)) as stage:
        Path(stage, "old-shard").write_text("1")
        fs.write_text(fs.join(stage, "manifest.json"), "{}")
    with pytest.raises(DataError, match="already holds prepared data"):
        with fs.staged_dir(str(out)):
            pass
    with pytest.raises(RuntimeError, match="disk full"):
        with fs.staged_dir(str(out), overwrite=True) as stage:
            Path(stage, "new-shard").write_text("2")
            assert not (out / "new-shard").exists()  # readers still see only the old set
            raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "old-shard"]  # last good set kept
    with fs.staged_dir(str(out), overwrite=True) as stage:
        Path(stage, "new-shard").write_text("2")
        fs.write_text(fs.join(stage, "manifest.json"), "{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "new-shard"]  # old shards gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or .old folder left
    # remote (file:// URI): shards first, manifest last, old contents removed
    uri = f"file://{tmp_path}/remote"
    for name in ("one", "two"):
        with fs.staged_dir(uri, overwrite=True) as stage:
            fs.write_text(fs.join(stage, name), name)
            fs.write_text(fs.join(stage, "manifest.json"), json.dumps({"v": name}))
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["manifest.json", "two"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_manifest_reader_names_folder_and_command(shard_sets, tmp_path):
    with pytest.raises(DataError, match=r"holds 'text' data, not 'audio'.*megaray prepare audio --source"):
        read_manifest(shard_sets["a"], "audio")
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "megaray.text/v1"}))
    with pytest.raises(
        DataError,
        match=f"{old}/manifest.json: format 'megaray.text/v1'.*megaray prepare text --source SOURCE --out {old}",
    ):
        load_manifest(str(old))
    (old / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt .*manifest.json"):
        load_manifest(str(old))
