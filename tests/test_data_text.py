"""Text data layer: stdlib corpus, prepare_text (validation, rejects, atomicity), Ray Data packing."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megaray.data import text
from megaray.data.sources import DataError, list_files
from megaray.data.stdlib import build_stdlib_corpus, iter_stdlib_docstrings
from megaray.data.text import (
    equal_batches,
    load_manifest,
    num_windows,
    prepare_text,
    raw_text_dataset,
    split_of,
    text_datasets,
    unigram_entropy,
)
from megaray.data.text.writer import ShardWriter
from megaray.data.tokenizer import EOS, load_tokenizer

PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ray Data streams blocks between tasks and actors; training reads them with iter_torch_batches.",
    "A byte-level BPE never maps text to an unknown token, because every byte is in its alphabet.",
    "Validation documents are chosen by hashing a stable document id, so the split never moves.",
    "Packing concatenates documents separated by an end-of-text token and cuts fixed windows.",
    "DeepSpeed ZeRO shards optimizer state across ranks; every rank must take the same number of steps.",
    "MLflow records parameters, metrics and artifacts for every run, and nests Tune trials.",
    "Entropy of the unigram distribution is the loss of a model that ignores context entirely.",
]


def _read_rows(shards: str, split: str):
    m = load_manifest(shards)
    rows = []
    for s in m["splits"][split]["shards"]:
        rows += pq.read_table(Path(shards) / s["path"]).column("tokens").to_pylist()
    return rows


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "stdlib"
    # small shards and row groups so the Ray tests cross file and row-group boundaries
    m = prepare_text(
        ["stdlib"],
        str(out),
        vocab_size=400,
        stdlib_max_docs=400,
        val_fraction=0.1,
        rows_per_group=64,
        tokens_per_shard=15000,
        progress=False,
        verbose=False,
    )
    assert len(m["splits"]["train"]["shards"]) >= 3 and m["splits"]["train"]["shards"][0]["row_groups"] >= 2
    return str(out)


# ----------------------------------------------------------------------------- corpus


def test_stdlib_corpus_deterministic_split_by_document(tmp_path):
    a = build_stdlib_corpus(tmp_path / "a", max_docs=300)
    b = build_stdlib_corpus(tmp_path / "b", max_docs=300)
    for name in ("train.jsonl", "val.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    docs = {s: [json.loads(line) for line in (a / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val")}
    assert len(docs["train"]) + len(docs["val"]) == 300
    ids = {s: {d["id"] for d in docs[s]} for s in docs}
    assert not ids["train"] & ids["val"]
    assert all(split_of(i, 0.02, 0) == s for s in ids for i in ids[s])
    assert not {d["text"] for d in docs["train"]} & {d["text"] for d in docs["val"]}
    assert all(len(d["text"]) >= 64 and d["text"] == d["text"].strip() for s in docs for d in docs[s])


def test_stdlib_scan_skips_tests_and_site_packages(tmp_path):
    doc = '"""{}: ' + "long enough docstring text " * 4 + '"""\n'
    files = {
        "json/decoder.py": doc.format("module")
        + "class A:\n    "
        + doc.format("class A")
        + "    def f(self):\n        "
        + doc.format("A.f"),
        "pkg/short.py": '"""too short"""\n',
        "twin.py": doc.format("module"),  # exact duplicate of json/decoder.py's module docstring
        "bad.py": "def broken(:\n",
    }
    for skipped in ("test", "tests", "site-packages", "idlelib/idle_test", "lib2to3/tests", "__pycache__"):
        files[f"{skipped}/mod.py"] = doc.format(skipped)
    for rel, src in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(src)
    stats = {}
    docs = list(iter_stdlib_docstrings(tmp_path, stats=stats))
    assert [i for i, _ in docs] == [
        "stdlib:json/decoder.py:<module>",
        "stdlib:json/decoder.py:A",
        "stdlib:json/decoder.py:A.f",
    ]
    assert docs[2][1].startswith("A.f: long enough")
    assert stats == {"files": 4, "unparsable_files": 1, "too_short": 1, "duplicates": 1, "documents": 3}


# ----------------------------------------------------------------------------- prepare


def _messy_folder(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(PROSE[0])
    (src / "sub" / "b.md").write_text("# Title\n\n" + PROSE[1])
    lines = [
        json.dumps({"text": PROSE[2]}),
        json.dumps({"text": PROSE[3], "id": "doc-3"}),
        "",  # blank line: not a record
        json.dumps({"text": "   "}),  # empty
        "{not json",  # invalid_json
        json.dumps({"title": "no text"}),  # no_text_field
        json.dumps({"text": 5}),  # non_text
        json.dumps({"text": PROSE[0]}),  # duplicate of a.txt
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n'  # undecodable_utf8
    (src / "c.jsonl").write_bytes(data)
    pq.write_table(pa.table({"text": [PROSE[4], None, PROSE[5], PROSE[6]]}), src / "d.parquet")
    rng = np.random.default_rng(0)
    (src / "junk.bin").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())  # unsupported_extension
    (src / "junk.txt").write_bytes(b"\xff\xfe" + rng.integers(0, 256, 512, dtype=np.uint8).tobytes())  # undecodable
    (src / "empty.txt").write_bytes(b"")  # empty_file
    (src / "nul.md").write_text("abc\x00def")  # binary
    (src / ".hidden.txt").write_text(PROSE[7])  # hidden: skipped, counted
    return src


def test_prepare_counts_rejects_and_roundtrips(tmp_path):
    src = _messy_folder(tmp_path)
    out = tmp_path / "out"
    m = prepare_text([str(src)], str(out), vocab_size=300, val_fraction=0.3, progress=False, verbose=False)
    # 7 good documents: a.txt, b.md, 2 jsonl, 3 parquet rows
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 7
    rej = {k: v["count"] for k, v in m["rejected"]["by_reason"].items()}
    assert rej == {
        "empty": 2,  # blank jsonl text + null parquet row
        "invalid_json": 1,
        "no_text_field": 1,
        "non_text": 1,
        "duplicate": 1,
        "undecodable_utf8": 2,
        "unsupported_extension": 1,
        "empty_file": 1,
        "binary": 1,
    }
    assert m["rejected"]["total"] == sum(rej.values())
    assert any("junk.txt" in e for e in m["rejected"]["by_reason"]["undecodable_utf8"]["examples"])
    assert any(e.endswith("c.jsonl:9") for e in m["rejected"]["by_reason"]["undecodable_utf8"]["examples"])
    assert m["files"] == {
        "read": 8,
        "by_extension": {"bin": 1, "jsonl": 1, "md": 2, "parquet": 1, "txt": 3},
        "hidden_skipped": 1,
    }
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train", "val"]
    assert not list(tmp_path.glob("out.tmp-*"))

    tok = load_tokenizer(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    assert m["eos_id"] == eos == 0 and m["vocab_size"] == tok.get_vocab_size()
    decoded = set()
    for split in ("train", "val"):
        rows = _read_rows(str(out), split)
        assert len(rows) == m["splits"][split]["documents"]
        assert sum(map(len, rows)) == m["splits"][split]["tokens"]
        assert all(r[-1] == eos and eos not in r[:-1] for r in rows)
        decoded |= {tok.decode(r[:-1]) for r in rows}
    expected = {PROSE[0].strip(), "# Title\n\n" + PROSE[1], *PROSE[2:7]}
    assert decoded == expected  # byte-level BPE round-trips exactly
    # the split follows the document id: c.jsonl line 2 carries id "doc-3"
    val_text = {tok.decode(r[:-1]) for r in _read_rows(str(out), "val")}
    assert (PROSE[3] in val_text) == (split_of("doc-3", 0.3, 0) == "val")
    # entropy in the manifest is -sum p log p over val token counts
    vals = np.concatenate([np.array(r) for r in _read_rows(str(out), "val")])
    p = np.bincount(vals) / len(vals)
    p = p[p > 0]
    assert unigram_entropy(str(out)) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)


def test_prepare_stdlib_matches_corpus_split(small_shards, tmp_path):
    m = load_manifest(small_shards)
    assert m["splits"]["val"]["documents"] > 0 and m["rejected"]["total"] == 0
    corpus = build_stdlib_corpus(tmp_path / "c", max_docs=400, val_fraction=0.1)
    val_docs = [json.loads(line)["text"] for line in (corpus / "val.jsonl").read_text().splitlines()]
    tok = load_tokenizer(str(Path(small_shards) / "tokenizer.json"))
    assert sorted(tok.decode(r[:-1]) for r in _read_rows(small_shards, "val")) == sorted(val_docs)


def test_missing_and_empty_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"empty: {empty}"):
        prepare_text([str(empty)], str(tmp_path / "o"), progress=False, verbose=False)
    with pytest.raises(DataError, match="not found: .*nope"):
        prepare_text([str(tmp_path / "nope")], str(tmp_path / "o"), progress=False, verbose=False)
    with pytest.raises(DataError, match="no files match"):
        prepare_text([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), progress=False, verbose=False)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="no usable documents.*unsupported_extension"):
        prepare_text([str(only_bad)], str(tmp_path / "o"), progress=False, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty"]  # nothing written


def test_sources_globs_and_file_uri(tmp_path):
    src = _messy_folder(tmp_path)
    files = list_files(f"file://{src}").files
    assert [f.relpath for f in files][:3] == ["a.txt", "c.jsonl", "d.parquet"]
    assert len(files) == 8 and all(f.display.startswith("file://") for f in files)
    assert [f.relpath for f in list_files(str(src / "**" / "*.md")).files] == ["nul.md", "sub/b.md"]


def test_prepare_to_uri_uploads_manifest_last(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(PROSE):
        (src / f"{i}.txt").write_text(t)
    uri = f"file://{tmp_path}/remote/out"
    m = prepare_text([f"file://{src}"], uri, vocab_size=300, val_fraction=0.3, progress=False, verbose=False)
    assert load_manifest(uri) == json.loads((tmp_path / "remote/out/manifest.json").read_text())
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(PROSE)
    text.check_shards(uri)
    assert text.manifest_tokenizer(uri).token_to_id(EOS) == 0
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_text([str(src)], uri, vocab_size=300, progress=False, verbose=False)


def test_corrupt_parquet_source_names_file_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(PROSE[0])
    pq.write_table(pa.table({"text": PROSE}), src / "cut.parquet")
    raw = (src / "cut.parquet").read_bytes()
    (src / "cut.parquet").write_bytes(raw[: len(raw) // 2])  # truncated upload
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"corrupt .*cut\.parquet"):
        prepare_text([str(src)], str(out), vocab_size=300, progress=False, verbose=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out.tmp-* left either


def test_crash_mid_write_leaves_no_complete_output(tmp_path, monkeypatch):
    src = _messy_folder(tmp_path)

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "close", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_text([str(src)], str(tmp_path / "out"), vocab_size=300, progress=False, verbose=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_overwrite_and_unprepared_dirs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(PROSE):
        (src / f"{i}.txt").write_text(t)
    out = tmp_path / "out"
    prepare_text([str(src)], str(out), vocab_size=300, val_fraction=0.2, progress=False, verbose=False)
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_text([str(src)], str(out), vocab_size=300, progress=False, verbose=False)
    m = prepare_text(
        [str(src)], str(out), vocab_size=280, val_fraction=0.2, overwrite=True, progress=False, verbose=False
    )
    assert load_manifest(str(out))["vocab_size"] == m["vocab_size"] <= 280
    # a folder without manifest (a crashed or foreign write) is refused by readers
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json.*megaray prepare text"):
        text_datasets(str(out), block_size=8)
    with pytest.raises(DataError, match="not found.*megaray prepare text"):
        load_manifest(str(tmp_path / "missing"))


def test_corrupt_shard_is_named(small_shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_shards, bad)
    shard = bad / load_manifest(str(bad))["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"corrupt shard .*train/part-00000\.parquet"):
        text_datasets(str(bad), block_size=16)


def test_equal_batches_and_num_windows(small_shards):
    assert equal_batches(100, 2, 8) == 6 and equal_batches(15, 2, 8) == 0
    with pytest.raises(ValueError):
        equal_batches(10, 0, 8)
    m = load_manifest(small_shards)
    T = m["splits"]["train"]["tokens"]
    assert num_windows(m, 32) == T // 33 and num_windows(small_shards, 32, pack_concurrency=3) == T // 33 - 2


# ----------------------------------------------------------------------------- Ray Data


def test_packed_windows_match_token_stream(ray_local, small_shards):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # read_parquet copies the current context
    try:
        block = 32
        ds = text_datasets(small_shards, block_size=block, seed=0, shuffle_buffer=0)["train"]
    finally:
        ctx.execution_options.preserve_order = old
    batches = list(ds.iter_batches(batch_size=64, batch_format="numpy"))
    x = np.concatenate([b["input_ids"] for b in batches])
    y = np.concatenate([b["targets"] for b in batches])
    assert x.dtype == y.dtype == np.int64 and x.shape[1] == y.shape[1] == block
    stream = np.concatenate([np.array(r, dtype=np.int64) for r in _read_rows(small_shards, "train")])
    n = len(stream) // (block + 1)
    assert len(x) == n == num_windows(small_shards, block)
    w = stream[: n * (block + 1)].reshape(n, block + 1)
    np.testing.assert_array_equal(x, w[:, :-1])
    np.testing.assert_array_equal(y, w[:, 1:])


def test_packer_actors_run_batches_in_arrival_order(ray_local, small_shards):
    """The packer is stateful (it carries the stream tail), so its actors must not run batches out
    of order, which Ray Data's actor pools allow by default; the order bug it guards against showed
    up only under load (a short row group packed first, shifting every window)."""
    ds = text_datasets(small_shards, block_size=16, seed=0, shuffle_buffer=0)["train"]
    op = ds._logical_plan.dag
    assert op.name.endswith("Packer)"), op.name
    assert op.ray_remote_args["allow_out_of_order_execution"] is False
    assert op.ray_remote_args["max_restarts"] == 0


def test_streaming_split_equal_batches_per_rank(ray_local, small_shards):
    block, bs, world = 16, 4, 2
    ds = text_datasets(small_shards, block_size=block, seed=3, shuffle_buffer=16)["train"]
    expect = equal_batches(num_windows(small_shards, block), world, bs)
    assert expect > 2
    its = ds.streaming_split(world, equal=True)
    counts = [[0, 0], [0, 0]]
    errors = []

    def rank(i):
        try:
            for epoch in range(2):
                stop = expect - 1 if epoch == 0 else None  # epoch 0: trainer stops early
                for b in its[i].iter_torch_batches(
                    batch_size=bs, drop_last=True, local_shuffle_buffer_size=16, local_shuffle_seed=epoch
                ):
                    assert b["input_ids"].shape == (bs, block)
                    assert (b["input_ids"][:, 1:] == b["targets"][:, :-1]).all()
                    counts[i][epoch] += 1
                    if stop is not None and counts[i][epoch] == stop:
                        break
        except BaseException as e:  # surface thread failures
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert counts == [[expect - 1, expect], [expect - 1, expect]]


def test_raw_text_dataset(ray_local, small_shards, tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in PROSE[:4]) + "\n")
    for i, t in enumerate(PROSE[4:]):
        (src / f"{i}.txt").write_text(t)
    tok_path = str(Path(small_shards) / "tokenizer.json")
    block = 8
    ds = raw_text_dataset([str(src)], tok_path, block_size=block, concurrency=1)
    rows = ds.take_all()
    x = np.stack([r["input_ids"] for r in rows])
    y = np.stack([r["targets"] for r in rows])
    assert x.shape[1] == block and (x[:, 1:] == y[:, :-1]).all()
    tok = load_tokenizer(tok_path)
    total = sum(len(e.ids) + 1 for e in tok.encode_batch([t.strip() for t in PROSE], add_special_tokens=False))
    assert len(rows) == total // (block + 1)
