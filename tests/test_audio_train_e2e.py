"""Audio families through the one training loop: 2 Ray Train workers, DeepSpeed engines (two for
the GAN vocoder), a crash after a checkpoint, a resumed re-run, and wav/PNG artifacts in MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megaray.families import load_config

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")]


def _trace(prefix: Path, rank: int):
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}").read_text().splitlines() if line.endswith("}")]


def _audio_cfg(config, speech_shards, tmp_path, *extra):
    return load_config(REPO / "configs" / config, [
        f"data.shards={speech_shards}", "data.batch_size=1", f"scaling.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.checkpoint_every=2", "train.eval_every=2",
        "train.log_every=1", "train.warmup_steps=1", "scaling.max_failures=0", *extra])


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


def test_gan_vocoder_trains_crashes_resumes_and_logs_audio(speech_shards, tmp_path, monkeypatch):
    from megaray.train.launch import fit

    cfg = _audio_cfg("vocoder_tiny.yaml", speech_shards, tmp_path, "train.max_steps=4", "model.adv_start_step=1")
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("MEGARAY_FAULT_AT_STEP", "2")
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg)
    monkeypatch.delenv("MEGARAY_FAULT_AT_STEP")
    result = fit(cfg)
    assert result.metrics["step"] == 4
    for rank in (0, 1):
        got = _trace(tmp_path / "trace", rank)
        assert [r["step"] for r in got] == [1, 2, 3, 4]  # resumed at 3, generator and discriminator restored
        assert got[1]["pid"] != got[2]["pid"]
    _check_run(result, tmp_path, 4, {"model", "disc"})


def test_audio_vae_trains_and_logs_audio(speech_shards, tmp_path):
    """Resume is the same loop code the vocoder test crashes and resumes; one run here."""
    from megaray.train.launch import fit

    result = fit(_audio_cfg("audio_vae_small.yaml", speech_shards, tmp_path, "train.max_steps=2"))
    assert result.metrics["step"] == 2
    _check_run(result, tmp_path, 2, {"model"})
