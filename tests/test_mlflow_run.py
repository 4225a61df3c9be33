"""A complete MLflow run: system metrics, the data as dataset inputs, the command line, and the
final model as a registered ``pyfunc`` model that generates text. One short 1-worker fit against
a real ``mlflow server`` proves all of it."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO

from megaray.families import load_config

pytestmark = pytest.mark.slow


def _digest(entry) -> str:
    """What the manifest digest must be: SHA-256 of the split entry's canonical JSON (16 hex)."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def test_fit_logs_system_metrics_datasets_command_and_a_registered_text_model(
    ray_cluster, text_shards, mlflow_server, tmp_path
):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from megaray.tasks.lm import sample_text
    from megaray.train.checkpoint import load_for_inference
    from megaray.train.launch import fit

    cfg = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "name=complete",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            "scaling.num_workers=1",
            "train.max_steps=8",
            "train.eval_every=8",
            "train.checkpoint_every=8",
            "train.log_every=4",
            "eval.sample_tokens=0",
            f"tracking.tracking_uri={mlflow_server}",
            "tracking.system_metrics_interval_s=0.5",
            "tracking.register_model=megaray-test-lm",
        ],
    )
    result = fit(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"

    # system metrics of the (one) node, sampled during training, keyed by node: system/<host>-<node id>/...
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/") and k.count("/") == 2}
    assert len(nodes) == 1, sorted(run.data.metrics)
    (node,) = nodes
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{node}/{name}" in run.data.metrics, sorted(run.data.metrics)
    assert 0 <= run.data.metrics[f"system/{node}/cpu_utilization_percentage"] <= 100 * 64

    # the command line as the run description
    # (shell-quoted: under `pytest -m "not cluster"` the last word is 'not cluster')
    assert shlex.split(run.data.tags["mlflow.note.content"])[1:] == sys.argv[1:]

    # the prepared data as dataset inputs with the manifest's digests
    manifest = json.loads((Path(text_shards) / "manifest.json").read_text())
    got = {
        d.dataset.name: (d.dataset.digest, d.dataset.source, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }
    base = Path(text_shards).name
    assert got[f"{base}/train"][0] == _digest(manifest["splits"]["train"])
    assert got[f"{base}/val"][0] == _digest(manifest["splits"]["val"])
    assert (got[f"{base}/train"][2], got[f"{base}/val"][2]) == ("training", "validation")
    assert text_shards in got[f"{base}/train"][1]

    # the final model: a pyfunc that generates what sample_text generates from the checkpoint
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(mlflow_server):
        served = mlflow.pyfunc.load_model(run.data.tags["megaray.model_uri"])
    prompts = ["The ", "def "]
    out = served.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6, "temperature": 0.7})
    model, _, ckpt = load_for_inference(result.checkpoint)
    tok = (ckpt / "tokenizer.json").read_text()
    expected = [sample_text(model, tok, p, 6, temperature=0.7, top_k=40) for p in prompts]
    assert list(out) == expected
    assert all(isinstance(s, str) and len(s) > len(p.strip()) for s, p in zip(out, prompts))

    # registered in the Model Registry
    versions = client.search_model_versions("name='megaray-test-lm'")
    assert [v.run_id for v in versions] == [run.info.run_id]
