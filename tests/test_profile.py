"""``megaray train --profile STEPS``: a short ``<name>-profile`` run under ``torch.profiler``
(megaray.train.profiler): a Chrome trace with the model's forward ops, an operator table in the
run folder and in MLflow, no checkpoints, the real run untouched."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_profile_3_steps_writes_a_chrome_trace_and_an_operator_table(ray_cluster, text_shards, tmp_path):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from megaray.cli import app

    db = tmp_path / "mlflow.db"
    sets = [
        "name=prof",
        f"data.shards={text_shards}",
        f"scaling.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{db}",
        "scaling.num_workers=1",
        "scaling.max_failures=0",
        "train.log_every=1",
        "tracking.system_metrics_interval_s=0",
    ]
    out = CliRunner().invoke(
        app,
        [
            "train",
            str(REPO / "configs" / "gpt_debug.yaml"),
            "--profile",
            "3",
            *[a for kv in sets for a in ("--set", kv)],
        ],
    )
    assert out.exit_code == 0, out.output
    run = tmp_path / "runs" / "prof-profile"
    folder = run / "profile"
    assert f"trace {folder / 'trace.json'}" in out.output and f"profile     {folder / 'trace.json'}" in out.output

    trace = json.loads((folder / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert sorted(n for n in names if str(n).startswith("ProfilerStep#")) == [
        "ProfilerStep#2",
        "ProfilerStep#3",
        "ProfilerStep#4",
    ]  # 3 recorded steps after 2 warm-up steps
    assert {"aten::linear", "aten::addmm"} & names, sorted(n for n in names if str(n).startswith("aten::"))[:40]
    assert "aten::scaled_dot_product_attention" in names or "aten::softmax" in names
    assert any("[memory]" == e.get("name") for e in trace["traceEvents"])  # profile_memory
    table = (folder / "operators.txt").read_text()
    assert "by self cpu time" in table and "aten::" in table and "Self CPU" in table

    assert not list(run.glob("step_*")) and not (tmp_path / "runs" / "prof").exists()  # no checkpoints; no real run
    client = MlflowClient(f"sqlite:///{db}")
    [found] = client.search_runs([client.get_experiment_by_name("megaray").experiment_id])
    assert found.info.run_name == "prof-profile" and found.info.status == "FINISHED"
    assert found.data.tags["megaray.profile_steps"] == "3"
    assert {a.path for a in client.list_artifacts(found.info.run_id, "profile")} == {
        "profile/trace.json",
        "profile/operators.txt",
    }
    got = client.download_artifacts(found.info.run_id, "profile/operators.txt", str(tmp_path))
    assert open(got).read() == table
    assert "val_loss" not in found.data.metrics  # no evaluation
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]  # 2 warm-up + 3 recorded steps
