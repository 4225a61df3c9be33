"""Every CLI error case of issue 9 ends in ``error: ...`` naming the file or value, exit 2, no
traceback, and (for the commands that use Ray) before Ray starts. None of these tests starts Ray:
``ensure_ray`` is replaced by a function that fails the test if a command reaches it.

Cases run through the real console entry point in a subprocess where the absence of a traceback
matters (a ``CliRunner`` swallows tracebacks), and through ``CliRunner`` on the real app elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.families import build_model, load_config
from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_dir_name

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _megaray(*args, env=None):
    """The installed ``megaray`` console script (``python -m megaray.cli`` when not installed)."""
    script = Path(sys.executable).parent / "megaray"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "megaray.cli"]
    return subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def _assert_user_error(r, *needles):
    """exit 2, ``error:`` on stderr naming every needle, no traceback anywhere."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "error: " in r.stderr, r.stderr
    for n in needles:
        assert str(n) in r.stderr, (n, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout


def _assert_cli_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "error: " in r.output
    for n in needles:
        assert str(n) in r.output, (n, r.output)
    assert "Traceback" not in r.output


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    import megaray.train.launch as launch

    def boom(*a, **k):
        raise AssertionError("the command started Ray before reporting the error")

    monkeypatch.setattr(launch, "ensure_ray", boom)


def _write_checkpoint(run_dir: Path, config: Path, step: int = 4, overrides=()) -> Path:
    """The files ``load_for_inference`` reads (config.yaml, model.pt with a real state dict,
    megaray.json), as ``train.checkpoint.save`` lays them out; no Ray, no DeepSpeed."""
    cfg = load_config(config, list(overrides))
    ckpt = run_dir / checkpoint_dir_name(step)
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "tokens": 0}))
    return ckpt


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def truncated_gpt_checkpoint(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "run", REPO / "configs" / "gpt_debug.yaml")
    (ckpt / "tokenizer.json").write_text("{}")
    weights = ckpt / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return ckpt


@pytest.mark.parametrize("cmd", ["eval", "generate"])
def test_truncated_model_pt_is_named(truncated_gpt_checkpoint, cmd):
    r = _megaray(cmd, "--checkpoint", truncated_gpt_checkpoint.parent)
    _assert_user_error(r, f"{checkpoint_dir_name(4)}/{WEIGHTS_FILE} is truncated or corrupt")


@pytest.mark.parametrize("cmd", ["eval", "generate"])
def test_text_commands_on_a_vocoder_checkpoint_say_so(tmp_path, cmd):
    ckpt = _write_checkpoint(tmp_path / "voc-run", REPO / "configs" / "vocoder_tiny.yaml")
    r = _run(cmd, "--checkpoint", ckpt.parent)
    _assert_cli_error(r, ckpt, "not a text model's checkpoint", "'vocoder'")


def test_debug_env_shows_the_traceback_and_still_exits_2(tmp_path):
    r = _megaray("generate", "--checkpoint", tmp_path / "no-such-run", env={"MEGARAY_DEBUG": "1"})
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "CheckpointError" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ") and "no-such-run" in r.stderr


def test_other_exceptions_keep_their_traceback(monkeypatch, tmp_path):
    import megaray.inference.generate as gen

    def crash(*a, **k):
        raise RuntimeError("a bug, not the user's doing")

    monkeypatch.setattr(gen, "generate_text", crash)
    ckpt = _write_checkpoint(tmp_path / "gpt-run", REPO / "configs" / "gpt_debug.yaml")  # a real text checkpoint
    r = _run("generate", "--checkpoint", ckpt.parent)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    assert "error: " not in r.output


# --------------------------------------------------------------------------- option values


def test_generate_top_p_out_of_range():
    t0 = time.perf_counter()
    r = _megaray("generate", "--checkpoint", "runs/whatever", "--top-p", "1.5")
    _assert_user_error(r, "error: --top-p must be in (0, 1], got 1.5")
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--checkpoint", "x", "--top-p", "0"], "--top-p must be in (0, 1], got 0"),
        (["generate", "--checkpoint", "x", "--top-k", "-1"], "--top-k must be >= 0, got -1"),  # 0 = no cut
        (["generate", "--checkpoint", "x", "--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
        (["generate", "--checkpoint", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["eval", "--checkpoint", "x", "--max-batches", "0"], "--max-batches must be >= 1, got 0"),
        (["eval", "--checkpoint", "x", "--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
        (["eval", "--checkpoint", "x", "--split", "valid"], "--split must be one of val, train, got 'valid'"),
        (["prepare", "text", "--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
        (["prepare", "text", "--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1"),
        (["prepare", "text", "--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0"),
        (["prepare", "text", "--val-fraction", "-0.1"], "--val-fraction must be in (0, 1), got -0.1"),
        (
            ["prepare", "text", "--tokenizer", "/no/such/tokenizer.json"],
            "--tokenizer: file not found: /no/such/tokenizer.json",
        ),
        (["prepare", "audio", "--clips", "0"], "--clips must be >= 1, got 0"),
        (["prepare", "audio", "--n-mels", "0"], "--n-mels must be >= 1, got 0"),
        (["prepare", "audio", "--n-fft", "-1"], "--n-fft must be >= 1, got -1"),
        (["prepare", "audio", "--hop-length", "0"], "--hop-length must be >= 1, got 0"),
        (["prepare", "audio", "--sample-rate", "0"], "--sample-rate must be >= 1, got 0"),
        (["prepare", "audio", "--normalize", "peek"], "did you mean 'peak'?"),
        (
            ["prepare", "audio-latents", "--vae-checkpoint", "x", "--out", "y", "--concurrency", "0"],
            "--concurrency must be >= 1, got 0",
        ),
    ],
)
def test_option_out_of_range_names_option_and_value(no_ray, tmp_path, args, message):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a command that got past its checks would write here, not in the repo
    try:
        r = _run(*args)
    finally:
        os.chdir(cwd)
    _assert_cli_error(r, message)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- configs


def test_missing_config_file_is_named(tmp_path):
    r = _megaray("train", tmp_path / "nope.yaml")
    _assert_user_error(r, "config file not found", tmp_path / "nope.yaml")


def test_unknown_config_key_suggests_the_right_one():
    r = _run("config", REPO / "configs" / "gpt_debug.yaml", "--set", "train.lrr=1e-3")
    _assert_cli_error(r, "train.lrr", "unknown key", "did you mean 'lr'")


# --------------------------------------------------------------------------- prepare audio


def test_prepare_audio_missing_source_fails_before_ray(no_ray, tmp_path):
    missing = tmp_path / "no-such-folder"
    r = _run("prepare", "audio", "--source", missing, "--out", tmp_path / "out")
    _assert_cli_error(r, "source not found", missing)
    assert not (tmp_path / "out").exists()


def test_prepare_audio_missing_source_in_a_fresh_process_starts_no_ray(tmp_path):
    missing = tmp_path / "no-such-folder"
    t0 = time.perf_counter()
    r = _megaray("prepare", "audio", "--source", missing, "--out", tmp_path / "out")
    _assert_user_error(r, missing)
    assert "Ray instance" not in r.stdout + r.stderr
    assert time.perf_counter() - t0 < 60


def test_prepare_audio_into_non_empty_folder_needs_overwrite(no_ray, tmp_path):
    src, out = tmp_path / "wavs", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (out / "keep.txt").write_text("someone's files")
    r = _run("prepare", "audio", "--source", src, "--out", out)
    _assert_cli_error(r, out, "--overwrite")
    assert (out / "keep.txt").read_text() == "someone's files"


def test_prepare_audio_without_espeak_says_how_to_install_it(no_ray, monkeypatch, tmp_path):
    import megaray.data.speech_corpus as speech_corpus

    monkeypatch.setattr(speech_corpus.shutil, "which", lambda name: None)
    r = _run("prepare", "audio", "--source", "espeak", "--out", tmp_path / "speech")
    _assert_cli_error(r, "espeak-ng not found", "apt-get install espeak-ng")


def test_prepare_text_into_non_empty_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _run("prepare", "text", "--source", "stdlib", "--out", out, "--vocab-size", 300)
    _assert_cli_error(r, out, "--overwrite")


def _audio_manifest(shards: Path, n_mels: int) -> Path:
    """A prepared-audio folder as far as the manifest reader can tell (no clips are read)."""
    from megaray.data.manifest import new_manifest, write_manifest

    (shards / "train").mkdir(parents=True)
    (shards / "val").mkdir()
    write_manifest(
        str(shards),
        new_manifest(
            "audio",
            sample_rate=16000,
            n_mels=n_mels,
            n_fft=512,
            hop_length=128,
            clips=0,
            speakers={},
            splits={"train": {"dir": "train", "clips": 0}, "val": {"dir": "val", "clips": 0}},
        ),
    )
    return shards


def test_audio_latents_n_mels_mismatch_fails_before_ray(no_ray, tmp_path):
    vae = _write_checkpoint(tmp_path / "vae-run", REPO / "configs" / "audio_vae_small.yaml")
    vae_mels = load_config(vae / "config.yaml").model.n_mels
    shards = _audio_manifest(tmp_path / "speech", n_mels=vae_mels + 16)
    r = _run(
        "prepare", "audio-latents", "--vae-checkpoint", vae.parent, "--shards", shards, "--out", tmp_path / "latents"
    )
    _assert_cli_error(r, "n_mels", shards, f"n_mels={vae_mels + 16}", f"n_mels={vae_mels}")
    assert not (tmp_path / "latents").exists()


def test_audio_latents_wants_an_audio_vae_checkpoint(no_ray, tmp_path):
    ckpt = _write_checkpoint(tmp_path / "voc-run", REPO / "configs" / "vocoder_tiny.yaml")
    r = _run("prepare", "audio-latents", "--vae-checkpoint", ckpt, "--shards", tmp_path, "--out", tmp_path / "o")
    _assert_cli_error(r, "'vocoder' checkpoint, not an audio_vae")


# --------------------------------------------------------------------------- vocode


def test_vocode_missing_input_reports_the_input_not_the_checkpoint(tmp_path):
    missing = tmp_path / "missing.wav"
    r = _megaray("vocode", "--checkpoint", tmp_path / "no-run", "--input", missing, "--output", tmp_path / "o.wav")
    _assert_user_error(r, "input audio not found", missing)
    assert "no-run" not in r.stderr  # the checkpoint is not looked at before the input


def test_vocode_unreadable_input_is_named(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "voc-run", REPO / "configs" / "vocoder_tiny.yaml")
    bad = tmp_path / "notes.wav"
    bad.write_bytes(b"this is not audio" * 10)
    r = _run("vocode", "--checkpoint", ckpt, "--input", bad, "--output", tmp_path / "o.wav")
    _assert_cli_error(r, bad, "unreadable")
    assert not (tmp_path / "o.wav").exists()
