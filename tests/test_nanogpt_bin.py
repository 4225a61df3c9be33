"""nanoGPT ``train.bin`` / ``val.bin`` imported as text shards (``megaray prepare bin``): ids in order,
rows at EOS, the vocabulary check, and a short training run on the imported shards.

The .bin files are written as nanoGPT's ``data/openwebtext/prepare.py`` writes them: every
document encoded, the EOT id appended, all ids concatenated into one flat ``uint16`` array
(``arr.tofile``). The tokenizer is the session's stdlib BPE (512 tokens, ``<|endoftext|>`` = 0).
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli.app import app
from megaray.data.text import check_shards, load_manifest
from megaray.data.text.nanogpt import import_nanogpt_bin, row_lengths
from megaray.data.tokenizer import load_tokenizer
from megaray.errors import DataError

SMALL = dict(max_row_tokens=300, chunk_tokens=1000, group_tokens=2000)  # several chunks, cuts, row groups


@pytest.fixture(scope="module")
def bins(text_shards, tmp_path_factory):
    """``{dir, tokenizer, train, val}``: 240 stdlib docstrings encoded nanoGPT-style (uint16, EOT after each)."""
    from megaray.data.stdlib import iter_docstrings

    tokenizer = os.path.join(text_shards, "tokenizer.json")
    tok = load_tokenizer(tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    docs = [d.text for d in itertools.islice(iter_docstrings(), 240)]
    ids = [e.ids + [eot] for e in tok.encode_batch(docs, add_special_tokens=False)]
    out = tmp_path_factory.mktemp("nanogpt") / "stdlib"
    out.mkdir()
    split = {"train": np.concatenate(ids[:216]).astype(np.uint16), "val": np.concatenate(ids[216:]).astype(np.uint16)}
    for name, arr in split.items():
        arr.tofile(out / f"{name}.bin")
    return {"dir": str(out), "tokenizer": tokenizer, "eot": eot, **split}


def _rows(folder, split):
    man = load_manifest(folder)
    return [
        np.asarray(r, np.int64)
        for s in man["splits"][split]["shards"]
        for r in pq.read_table(os.path.join(folder, s["path"]), columns=["tokens"]).column(0).to_pylist()
    ]


def test_row_lengths_cut_long_documents_into_full_rows_then_the_rest():
    assert row_lengths(np.array([1, 3, 4, 9, 8]), 4).tolist() == [1, 3, 4, 4, 4, 1, 4, 4]


def test_imported_shards_hold_the_bin_ids_in_order_with_rows_at_eos(bins, tmp_path):
    out = str(tmp_path / "imported")
    man = import_nanogpt_bin(bins["dir"], out, bins["tokenizer"], verbose=False, **SMALL)
    check_shards(out)  # footers agree with the manifest, as the trainer checks them
    assert man["kind"] == "text" and man["tokenizer"]["vocab_size"] == 512 and man["nanogpt"]["dtype"] == "uint16"
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    for split in ("train", "val"):
        rows, ids = _rows(out, split), bins[split]
        np.testing.assert_array_equal(np.concatenate(rows), ids)  # every id, in order
        s = man["splits"][split]
        assert (
            s["tokens"] == len(ids)
            and s["eos_tokens"] == int((ids == bins["eot"]).sum())
            and s["documents"] == len(rows)
        )
        for r in rows:  # a row ends at EOT, or is a full cut of a longer document; EOT only at the end
            assert len(r) <= 300 and (r[-1] == bins["eot"] or len(r) == 300) and not (r[:-1] == bins["eot"]).any()
        assert sum(r[-1] == bins["eot"] for r in rows) == s["eos_tokens"]
    assert sum(sh["row_groups"] for sh in man["splits"]["train"]["shards"]) > 3
    # nothing is lost between chunks: the stream sizes differ from the chunk and row limits
    assert len(bins["train"]) % 1000 and any(len(r) == 300 for r in _rows(out, "train"))


def test_out_of_range_ids_dtype_and_missing_files_are_named_errors(bins, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    train = bins["train"].copy()
    train[1234] = 600  # beyond the 512-token vocabulary
    train.tofile(bad / "train.bin")
    bins["val"].tofile(bad / "val.bin")
    with pytest.raises(DataError) as e:
        import_nanogpt_bin(str(bad), str(tmp_path / "o1"), bins["tokenizer"], verbose=False)
    msg = str(e.value)
    assert f"{bad / 'train.bin'} holds token id 600 (max; first out-of-range id at token 1,234)" in msg
    assert "has 512 tokens (ids 0..511)" in msg and "GPT-2's has 50257" in msg
    assert not os.path.exists(tmp_path / "o1")  # checked before anything is written
    (bad / "train.bin").write_bytes(bins["train"].tobytes()[:-1])
    with pytest.raises(DataError, match=r"train.bin is \d[\d,]* bytes, not a whole number of uint16 ids"):
        import_nanogpt_bin(str(bad), str(tmp_path / "o2"), bins["tokenizer"], verbose=False)
    os.remove(bad / "val.bin")
    bins["train"].tofile(bad / "train.bin")
    with pytest.raises(DataError, match="nanoGPT split file not found: .*val.bin"):
        import_nanogpt_bin(str(bad), str(tmp_path / "o3"), bins["tokenizer"], verbose=False)


def test_uint32_files_import_with_dtype_uint32(bins, tmp_path):
    d = tmp_path / "u32"
    d.mkdir()
    for split in ("train", "val"):
        bins[split].astype(np.uint32).tofile(d / f"{split}.bin")
    man = import_nanogpt_bin(str(d), str(tmp_path / "o"), bins["tokenizer"], dtype="uint32", verbose=False)
    assert man["nanogpt"]["dtype"] == "uint32" and man["splits"]["val"]["tokens"] == len(bins["val"])
    np.testing.assert_array_equal(np.concatenate(_rows(str(tmp_path / "o"), "val")), bins["val"])


@pytest.mark.slow
def test_prepare_bin_cli_then_a_short_training_run_on_the_imported_shards(ray_cluster, bins, tmp_path):
    from megaray.families import load_config
    from megaray.train.launch import fit

    out = tmp_path / "owt"
    r = CliRunner().invoke(
        app, ["prepare", "bin", "--source", bins["dir"], "--tokenizer", bins["tokenizer"], "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "imported nanoGPT .bin" in r.output and load_manifest(str(out))["splits"]["train"]["tokens"] == len(
        bins["train"]
    )
    r = CliRunner().invoke(
        app,
        [
            "prepare",
            "bin",
            "--source",
            bins["dir"],
            "--tokenizer",
            bins["tokenizer"],
            "--out",
            str(tmp_path / "x"),
            "--dtype",
            "int8",
        ],
    )
    assert r.exit_code == 2 and "--dtype must be one of auto, uint16, uint32" in r.output

    cfg = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "name=nanogpt-bin",
            f"data.shards={out}",
            "scaling.num_workers=1",
            "train.max_steps=10",
            "train.lr=3e-3",
            "train.eval_every=10",
            "train.checkpoint_every=10",
            "train.log_every=5",
            f"scaling.storage_path={tmp_path / 'runs'}",
            "tracking.enabled=false",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == 10
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["val_loss"])
    assert result.metrics["val_loss"] < math.log(512) - 0.2  # it learns the imported stream (measured 5.78 < 6.24)
