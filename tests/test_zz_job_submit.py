"""The real client path: `ray start --head`, then `RAY_AUTH_MODE=token ray job submit ... -- megaray train`.

Runs last (file name) because it starts a second Ray cluster beside the session one; it stops
only the processes of the cluster it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from helpers import ray_start, ray_stop

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_megaray_train(text_shards, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    import ray

    ray.shutdown()  # the session's in-process cluster: its dashboard agent would hold the default agent ports
    gcs, dash = free_port(), free_port()
    ray_start(
        bin_dir,
        "--head",
        "--num-cpus=8",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        env=env,
    )
    try:
        storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
        cmd = [
            str(bin_dir / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(REPO),
            "--",
            "megaray",
            "train",
            "configs/gpt_debug.yaml",
            "--verbose",
            "--set",
            f"data.shards={text_shards}",
            "--set",
            f"scaling.storage_path={storage}",
            "--set",
            f"tracking.tracking_uri=sqlite:///{db}",
            "--set",
            "train.max_steps=10",
            "--set",
            "train.checkpoint_every=10",
            "--set",
            "train.eval_every=10",
        ]
        for _ in range(40):  # the dashboard's job agent comes up a little after `ray start` returns
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "succeeded" in out, out[-4000:]
        # --verbose: the workers' and Ray Train's own lines reach the console again
        assert "Reporting training result" in out and "[megaray] step 10/10" in out, out[-4000:]
        ckpt = storage / "gpt-debug" / "step_00000010"
        assert json.loads((ckpt / "megaray.json").read_text())["step"] == 10
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("megaray")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "val_loss" in runs[0].data.metrics
    finally:
        ray_stop(gcs)
