"""``data.val_shards``: a text run validates on another prepared folder. The val dataset the trainer
hands its evaluator (``LMTask.datasets()["val"]``, what ``ray.train.get_dataset_shard("val")``
serves) holds exactly that folder's windows; a folder with another tokenizer, or a family that
cannot read it, is refused before any worker starts; relative paths resolve like ``data.shards``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from megaray.errors import ConfigError, DataError
from megaray.families import build_run_config

BLOCK = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train: docs/*.md (its own 300-token BPE); val: README + BENCHMARKS with the train tokenizer;
    other: README with a tokenizer of its own."""
    from megaray.data.text import prepare_text

    root = tmp_path_factory.mktemp("val-shards")
    quiet = dict(progress=False, verbose=False)
    train = prepare_text([str(REPO / "docs")], str(root / "train"), vocab_size=300, val_fraction=0.3, **quiet)
    prepare_text(
        [str(REPO / "README.md"), str(REPO / "BENCHMARKS.md")],
        str(root / "val"),
        tokenizer=str(root / "train" / "tokenizer.json"),
        val_fraction=0.5,
        **quiet,
    )
    prepare_text(
        [str(REPO / "README.md"), str(REPO / "BENCHMARKS.md")],
        str(root / "other"),
        vocab_size=280,
        val_fraction=0.5,
        **quiet,
    )
    assert train["tokenizer"]["vocab_size"] <= 300
    return {k: str(root / k) for k in ("train", "val", "other")}


def _cfg(folders, **data):
    return build_run_config(
        {
            "model": {"family": "gpt", "preset": "debug", "vocab_size": 300, "block_size": BLOCK},
            "data": {"shards": folders["train"], "batch_size": 2, "num_val_batches": 2, **data},
            "train": {"max_steps": 4, "warmup_steps": 1},
            "scaling": {"num_workers": 1},
            "tracking": {"enabled": False},
        }
    )


def _windows(folder: str, split: str) -> np.ndarray:
    """The split's token stream cut into windows of BLOCK + 1, read straight from the parquet files
    in manifest order (independently of the code under test)."""
    from megaray.data.text import load_manifest

    entries = load_manifest(folder)["splits"][split]["shards"]
    stream = np.concatenate(
        [
            np.concatenate(pq.read_table(Path(folder) / e["path"], columns=["tokens"]).column("tokens").to_pylist())
            for e in entries
        ]
    )
    n = len(stream) // (BLOCK + 1)
    return stream[: n * (BLOCK + 1)].reshape(n, BLOCK + 1)


def test_validation_reads_the_other_folders_rows(folders, ray_local):
    from megaray.data import text
    from megaray.tasks.lm import LMTask

    task = LMTask(_cfg(folders, val_shards=folders["val"]))
    datasets = task.datasets()
    rows = datasets["val"].take_all()
    got = np.stack([np.concatenate([r["input_ids"], r["targets"][-1:]]) for r in rows])
    want = _windows(folders["val"], "val")
    assert len(want) >= 2 * 2  # enough for the two evaluation batches
    np.testing.assert_array_equal(got, want)  # every val row is a window of the val folder, in order
    assert not np.array_equal(got[0], _windows(folders["train"], "val")[0])  # not the train folder's own val split
    assert task.info.val_samples == len(want) == text.num_windows(folders["val"], BLOCK, "val")
    assert task.info.val_batches == min(2, len(want) // 2)
    val_manifest = text.load_manifest(folders["val"])
    assert task.info.unigram_entropy == val_manifest["splits"]["val"]["unigram_entropy_nats"]
    # training still reads the train folder (its windows are counted from it)
    assert task.info.train_windows == text.num_windows(folders["train"], BLOCK, "train")


def test_another_tokenizer_is_refused_naming_both_folders(folders):
    from megaray.tasks.lm import LMTask

    with pytest.raises(DataError, match="different tokenizers") as e:
        LMTask(_cfg(folders, val_shards=folders["other"])).datasets()
    assert folders["other"] in str(e.value) and folders["train"] in str(e.value)
    with pytest.raises(DataError, match="data.val_shards"):
        LMTask(_cfg(folders, val_shards=folders["other"] + "-missing")).datasets()


def test_split_rule_paths_and_families(folders, tmp_path, monkeypatch):
    from megaray.data.text.datasets import val_split_of
    from megaray.train.launch import check_run, resolve_paths

    assert val_split_of({"splits": {"train": {"tokens": 9}, "val": {"tokens": 3}}}) == "val"
    assert val_split_of({"splits": {"train": {"tokens": 9}, "val": {"tokens": 0}}}) == "train"
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(_cfg(folders, val_shards="data/held-out"))
    assert cfg.data.val_shards == str(tmp_path / "data" / "held-out")
    assert resolve_paths(_cfg(folders)).data.val_shards is None

    from megaray import families

    image = build_run_config({"model": {"family": "image_vae", "preset": "tiny"}, "data": {"val_shards": "x"}})
    with pytest.raises(ConfigError, match="data.val_shards: .*text language-model families"):
        check_run(image, families.task_class("image_vae")(image))
