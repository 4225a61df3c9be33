"""``s3://`` storage against a real S3 API on this machine: moto's server on 127.0.0.1.

One run proves: text shards prepared straight into a bucket, training from them with
``scaling.storage_path: s3://...`` (checkpoints uploaded asynchronously by Ray Train),
MLflow artifacts in the bucket, a crash, and a resume from the bucket on another number of
workers (1 instead of 2: the ZeRO-1 state converted to DeepSpeed's universal form) that starts
reading at the checkpoint's cursor (no replay) and repeats and skips no sample.

pyarrow's S3 filesystem (shards, Ray Train storage), boto3 (MLflow artifacts) and every Ray
worker read ``AWS_ENDPOINT_URL`` from the environment, set here before Ray starts (workers
inherit the raylet's environment). Runs in ``make test-cluster`` (marker ``cluster``): it needs a
Ray of its own started with that environment, not the session cluster of ``make test``. The
unit tests at the end (retry, the resumed checkpoint, elastic config) run in ``make test``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, free_port
from helpers import read_trace

BUCKET = "megaray-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with one bucket, the AWS environment pointing at it, and a
    local Ray started after (so its workers inherit that environment). Yields a boto3 client."""
    pytest.importorskip("moto")
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from megaray.train.launch import ensure_ray

    if ray.is_initialized():
        pytest.skip("needs a Ray of its own started with the S3 environment (run with -m cluster)")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    ensure_ray(num_cpus=8)
    try:
        yield client
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.cluster
def test_prepare_train_crash_resume_all_in_s3(s3, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from megaray.data.text import prepare_text
    from megaray.families import load_config
    from megaray.train.launch import fit

    shards = f"s3://{BUCKET}/data/stdlib-512"
    prepare_text(["stdlib"], shards, vocab_size=512, stdlib_max_docs=800)
    assert "data/stdlib-512/manifest.json" in _keys(s3, "data/stdlib-512/")

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(db).create_experiment("s3", artifact_location=f"s3://{BUCKET}/mlflow")  # artifacts in the bucket
    args = [
        f"data.shards={shards}",
        f"scaling.storage_path=s3://{BUCKET}/runs",
        f"tracking.tracking_uri={db}",
        "tracking.experiment=s3",
        "name=s3run",
        "train.max_steps=8",
        "train.checkpoint_every=2",
        "train.eval_every=4",
        "train.log_every=2",
        "train.zero_stage=1",
        "scaling.max_failures=0",
        "eval.sample_tokens=4",
        "data.num_val_batches=2",
    ]
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", args)
    trace = tmp_path / "trace"
    monkeypatch.setenv("MEGARAY_TRACE", str(trace))
    monkeypatch.setenv("MEGARAY_FAULT_AT_STEP", "5")
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg)
    # uploads run in the background: the crash may cut the step-4 one short, never the step-2 one
    assert "runs/s3run/step_00000002/megaray.json" in _keys(s3, "runs/s3run/step_00000002/")

    monkeypatch.delenv("MEGARAY_FAULT_AT_STEP")
    result = fit(load_config(REPO / "configs" / "gpt_debug.yaml", args + ["scaling.num_workers=1"]))
    assert result.metrics["step"] == 8
    assert result.checkpoint.endswith("runs/s3run/step_00000008")
    state = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/s3run/step_00000008/megaray.json")["Body"].read())
    assert state["step"] == 8 and state["world_size"] == 1 and state["global_batch"] == 2 * cfg.data.batch_size
    starts = [json.loads(line)["step"] for line in Path(f"{trace}.starts.rank0").read_text().splitlines()]
    assert starts[0] == 0 and starts[-1] in (2, 4), starts  # resumed from a checkpoint in the bucket
    k = starts[-1]
    first = [r for rank in (0, 1) for r in read_trace(trace, rank) if r["world"] == 2]
    second = [r for r in read_trace(trace, 0) if r["world"] == 1]
    assert sorted({r["step"] for r in first}) == [1, 2, 3, 4, 5]
    assert sorted({r["step"] for r in second}) == list(range(k + 1, 9))  # nothing before the checkpoint retrained
    assert all(r["replayed"] == 0 for r in second)  # the constant-time stream: no replay, from the bucket too

    def ids(rows, step):
        return sorted(i for r in rows if r["step"] == step for i in r["ids"])

    for step in range(k + 1, 6):  # the same global batches on 1 worker as on 2
        assert ids(second, step) == ids(first, step)
    trained = [i for step in range(1, 9) for i in ids(first if step <= k else second, step)]
    assert len(trained) == len(set(trained)) == 8 * state["global_batch"]  # none repeated or skipped
    arts = _keys(s3, "mlflow/")
    assert any(k.endswith("config/resolved.yaml") for k in arts), arts
    assert any(k.endswith("final_checkpoint.txt") for k in arts), arts


def test_upload_is_retried_on_transient_errors_only():
    from megaray.train.checkpoint import upload_with_retry

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "uploaded"

    assert upload_with_retry(flaky, "step_1", attempts=4, backoff_s=0.0) == "uploaded" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match="503"):
        upload_with_retry(
            lambda: calls.append(1) or (_ for _ in ()).throw(OSError("HTTP 503 SlowDown")),
            "step_1",
            attempts=2,
            backoff_s=0.0,
        )
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        upload_with_retry(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("gone")), "s", 4, 0.0)
    assert len(calls) == 1


def test_the_resumed_checkpoint_is_the_newest_every_rank_finished(tmp_path):
    from megaray.train.checkpoint import latest_local, resume_state

    assert resume_state(str(tmp_path / "nothing")) is None and latest_local(str(tmp_path / "nothing")) is None
    for step, world in ((2, 2), (4, 4), (5, 3)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "megaray.json").write_text(json.dumps({"step": step, "world_size": world}))
        for r in range(world if step != 5 else 2):  # step 5: rank 2 never finished writing
            (d / f"rng_rank{r}.pt").write_bytes(b"")
    (tmp_path / "step_00000006").mkdir()  # incomplete: no megaray.json
    assert resume_state(str(tmp_path)).step == 4  # the newest checkpoint every rank finished, as restore picks
    where, state = latest_local(str(tmp_path))
    assert where.name == "step_00000004" and state.world_size == 4


def test_num_workers_range_and_per_world_batches():
    from megaray.config import ConfigError
    from megaray.families import build_run_config
    from megaray.tasks.base import TaskInfo

    cfg = build_run_config({"model": {"family": "gpt", "preset": "debug"}, "scaling": {"num_workers": [1, 3]}})
    assert cfg.scaling.ray_num_workers() == (1, 3) and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 3)
    assert build_run_config({"model": {"family": "gpt", "preset": "debug"}}).scaling.ray_num_workers() == 2
    for bad in ([3, 1], [0, 2], [1, 2, 3]):
        with pytest.raises(ConfigError, match=r"scaling: num_workers: .* is not \[min, max\]"):
            build_run_config({"model": {"family": "gpt", "preset": "debug"}, "scaling": {"num_workers": bad}})
    from megaray.data.order import BatchPlan

    info = TaskInfo(plan=BatchPlan(samples=125, global_batch=12, micro_batch=2), val_samples=20, val_limit=8)
    assert (info.for_world(1).batches_per_epoch, info.for_world(1).val_batches) == (60, 8)  # 120 served: 60 x 2
    assert (info.for_world(3).batches_per_epoch, info.for_world(3).val_batches) == (20, 3)
    resumed = info.for_world(2, global_batch=24)  # a resumed run keeps its checkpoint's global batch
    assert resumed.plan.global_batch == 24 and resumed.batches_per_epoch == 30
