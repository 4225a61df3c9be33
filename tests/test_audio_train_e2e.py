"""Audio families through the one training loop: 2 Ray Train workers, DeepSpeed engines (two for
the GAN vocoder), a crash after a checkpoint, a resumed re-run whose per-step losses equal an
uninterrupted run's, EMA, a relative data path, and wav/PNG artifacts in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO
from helpers import crash_then_rerun, read_trace

from megaray.families import load_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")]


def _audio_cfg(config, speech_shards, tmp_path, *extra):
    return load_config(
        REPO / "configs" / config,
        [
            f"data.shards={speech_shards}",
            "data.batch_size=1",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.log_every=1",
            "train.warmup_steps=1",
            "scaling.max_failures=0",
            *extra,
        ],
    )


def _history(tmp_path, run_id, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _check_run(result, tmp_path, steps, modules):
    from mlflow.tracking import MlflowClient

    ckpt = Path(result.checkpoint)
    assert {p.name for p in ckpt.iterdir() if p.is_dir()} == modules  # one DeepSpeed engine per module
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, steps + 1))
    files = {Path(a.path).suffix for a in client.list_artifacts(run.info.run_id, f"eval/step_{steps:08d}")}
    assert {".wav", ".png"} <= files  # reconstructed audio and input-vs-output mel images


def test_gan_vocoder_trains_crashes_resumes_exactly_and_logs_audio(speech_shards, tmp_path, monkeypatch):
    """Crashed right after its step-2 checkpoint and re-run, the GAN run's per-step losses (generator,
    discriminator, feature matching) and its EMA weights equal an uninterrupted run's: generator,
    discriminator, EMA, RNG and data position (crops are a function of seed, clip and pass) resume."""
    import torch

    from megaray.train.launch import fit

    extra = (
        "train.max_steps=4",
        "model.adv_start_step=1",
        "train.ema_decay=0.5",
        "train.modules.disc.lr=1e-4",
        "train.modules.disc.betas=[0.5,0.9]",
    )
    cfg = _audio_cfg("vocoder_tiny.yaml", speech_shards, tmp_path, "name=gan-crash", *extra)
    result = crash_then_rerun(monkeypatch, cfg, tmp_path / "trace", 2)
    assert result.metrics["step"] == 4
    for rank in (0, 1):
        got = read_trace(tmp_path / "trace", rank)
        assert [r["step"] for r in got] == [1, 2, 3, 4]  # resumed at 3, generator and discriminator restored
        assert got[1]["pid"] != got[2]["pid"]
    _check_run(result, tmp_path, 4, {"model", "disc"})

    monkeypatch.delenv("MEGARAY_TRACE")
    straight = fit(_audio_cfg("vocoder_tiny.yaml", speech_shards, tmp_path, "name=gan-straight", *extra))
    for key in ("loss", "loss_disc", "loss_fm", "loss_gen_adv"):
        resumed, want = _history(tmp_path, result.mlflow_run_id, key), _history(tmp_path, straight.mlflow_run_id, key)
        steps = sorted(want)
        assert sorted(resumed) == steps and steps[-3:] == [2, 3, 4], key  # GAN terms from step 2 (adv_start_step 1)
        assert [resumed[s] for s in steps] == pytest.approx([want[s] for s in steps], abs=1e-6, rel=1e-6), key
    lr_disc = _history(tmp_path, result.mlflow_run_id, "lr_disc")
    assert lr_disc[1] < 1e-4 * 1.0001 and lr_disc[1] != _history(tmp_path, result.mlflow_run_id, "lr")[1]  # its own lr
    ema, ema_straight = (torch.load(Path(r.checkpoint) / "ema.pt") for r in (result, straight))
    model = torch.load(Path(result.checkpoint) / "model.pt")
    for k in ema:
        torch.testing.assert_close(ema[k], ema_straight[k], atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(ema[k], model[k].float()) for k in ema)  # an average, not the last weights
    assert result.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], abs=1e-6, rel=1e-6)


def test_audio_vae_trains_from_a_relative_data_path_and_logs_audio(speech_shards, tmp_path, monkeypatch):
    """Resume is the same loop code the vocoder test crashes and resumes; one run here. The data
    path is relative to the driver's working directory (as in the README): evaluation artifacts,
    read inside the workers, find it because the driver resolved it. The model is the reference
    geometry (configs/audio_vae_75x8.yaml: 80 mels -> 10 latent bands, frames / 75)."""
    import os

    from megaray.train.launch import fit

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(speech_shards, tmp_path)
    assert not Path(relative).is_absolute()
    result = fit(_audio_cfg("audio_vae_75x8.yaml", relative, tmp_path, "train.max_steps=2"))
    assert result.metrics["step"] == 2
    _check_run(result, tmp_path, 2, {"model"})
