"""Bad input gets a clear error naming the file or key, and leaves nothing that looks complete."""

from __future__ import annotations

import shutil

from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_prepare_from_empty_folder_names_it_and_writes_nothing(tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    r = _run("prepare", "text", "--source", empty, "--out", out, "--vocab-size", 300)
    assert r.exit_code == 2
    assert str(empty) in r.output
    assert not (out / "manifest.json").exists()


def test_prepare_from_corrupt_parquet_names_the_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "good.txt").write_text("A perfectly fine document about tokenizers.\n" * 50)
    (src / "broken.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 100)
    r = _run("prepare", "text", "--source", src, "--out", out, "--vocab-size", 300)
    if r.exit_code == 0:  # a corrupt source file may be skipped, but must then be reported by name
        import json

        manifest = json.loads((out / "manifest.json").read_text())
        assert "broken.parquet" in json.dumps(manifest["rejected"])
    else:
        assert r.exit_code == 2 and "broken.parquet" in r.output
        assert not (out / "manifest.json").exists()


def test_unknown_config_key_fails_before_any_work(tmp_path):
    r = _run(
        "train",
        REPO / "configs" / "gpt_debug.yaml",
        "--set",
        "train.learning_rate=1e-3",
        "--set",
        f"scaling.storage_path={tmp_path / 'runs'}",
    )
    assert r.exit_code == 2
    assert "train.learning_rate" in r.output and "unknown key" in r.output
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoint_is_named(tmp_path):
    for cmd in ("generate", "eval"):
        r = _run(cmd, "--checkpoint", tmp_path / "no-such-run")
        assert r.exit_code == 2, r.output
        assert "no-such-run" in r.output
    (tmp_path / "run" / "step_00000010").mkdir(parents=True)  # a write that never finished
    r = _run("generate", "--checkpoint", tmp_path / "run")
    assert r.exit_code == 2 and "no complete checkpoint" in r.output


def test_training_on_a_corrupt_shard_names_it_before_workers_start(ray_cluster, text_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(text_shards, shards)
    victim = sorted((shards / "train").glob("*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    r = _run(
        "train",
        REPO / "configs" / "gpt_debug.yaml",
        "--set",
        f"data.shards={shards}",
        "--set",
        f"scaling.storage_path={tmp_path / 'runs'}",
        "--set",
        "tracking.enabled=false",
    )
    assert r.exit_code == 2, r.output
    assert victim.name in r.output
    assert not (tmp_path / "runs" / "gpt-debug").exists()


def test_training_on_unprepared_shards_says_what_to_run(ray_cluster, tmp_path):
    r = _run(
        "train",
        REPO / "configs" / "gpt_debug.yaml",
        "--set",
        f"data.shards={tmp_path / 'nothing'}",
        "--set",
        "tracking.enabled=false",
        "--set",
        f"scaling.storage_path={tmp_path / 'runs'}",
    )
    assert r.exit_code == 2
    assert "megaray prepare text" in r.output and "nothing" in r.output


def test_help_texts():
    r = _run("--help")
    assert r.exit_code == 0
    for cmd in ("train", "prepare", "eval", "generate", "demo", "config"):
        assert cmd in r.output
    r = _run("train", "--help")
    assert "resumes" in r.output
