"""Golden losses: the first 20 optimizer steps of named configs must not move under refactors.

Each case trains one Ray Train worker (CPU, fp32, fixed seed) on a small corpus built in the
test session and compares every logged per-step loss with ``tests/assets/losses/<case>.json``
to 1e-5 (torchtitan keeps ``tests/assets/losses`` for the same reason).

A change that is *meant* to change the numbers (a new data order, a new init) regenerates them
deliberately, and says why in its commit::

    MEGARAY_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_losses.py

That rewrites the JSON files; review the diff before committing it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent / "assets" / "losses"
STEPS = 20
COMMON = ["train.max_steps=20", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
          "train.precision=fp32", "train.seed=1234", "scaling.num_workers=1", "scaling.max_failures=0",
          "tracking.sample_tokens=0"]
CASES = {
    # debug GPT on the stdlib corpus (512-token BPE), ZeRO-2
    "gpt_debug": ("gpt_debug.yaml", ["data.batch_size=4", "train.warmup_steps=4"], ("loss",)),
    # tiny GAN vocoder: reconstruction only for 5 steps, then adversarial + feature matching
    "vocoder_tiny": ("vocoder_tiny.yaml", ["data.batch_size=2", "train.warmup_steps=2", "model.adv_start_step=5"],
                     ("loss", "loss_disc", "loss_fm")),
}


def _history(uri: str, run_id: str, key: str):
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("case", list(CASES))
def test_golden_losses(case, request, ray_cluster, tmp_path):
    from megaray.families import load_config
    from megaray.train.launch import fit

    config, extra, keys = CASES[case]
    if case == "vocoder_tiny":
        if shutil.which("espeak-ng") is None:
            pytest.skip("needs espeak-ng")
        shards = request.getfixturevalue("speech_shards")
    else:
        shards = request.getfixturevalue("text_shards")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / config, [
        f"name=golden-{case}", f"data.shards={shards}", f"scaling.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri={uri}", *COMMON, *extra])
    result = fit(cfg)
    got = {key: _history(uri, result.mlflow_run_id, key) for key in keys}
    assert len(got["loss"]) == STEPS
    path = ASSETS / f"{case}.json"
    if os.environ.get("MEGARAY_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps({"config": config, "overrides": COMMON + extra, "metrics": got}, indent=1) + "\n")
        pytest.skip(f"rewrote {path}")
    want = json.loads(path.read_text())["metrics"]
    for key in keys:
        assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), key
