"""``megaray train --resume-from``: branching a run at an older checkpoint (megaray.train.branch).

Unit tests on hand-made checkpoint folders (no Ray), then one tiny end-to-end run: 12 steps with a
checkpoint every 4, branched at step 4 (crashing right after the branch's step-8 checkpoint) and
re-run plainly, with the per-step losses of the original run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import read_trace

from megaray.errors import CheckpointError
from megaray.train.branch import branch, find_checkpoint
from megaray.train.checkpoint import latest_local
from megaray.train.ray_compat import RAY_SNAPSHOT


def _checkpoint(run: Path, step: int, world: int = 1) -> Path:
    d = run / f"step_{step:08d}"
    (d / "model").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, d / "model" / "mp_rank_00_model_states.pt")
    for r in range(world):
        torch.save({"python": None}, d / f"rng_rank{r}.pt")
    (d / "megaray.json").write_text(json.dumps({"step": step, "world_size": world, "metrics": {"loss": 1.0 / step}}))
    return d


def _snapshot(run: Path, names) -> None:
    """Ray Train 2.60's checkpoint-manager snapshot listing ``names`` (the last is the latest)."""
    res = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"step": i}} for i, n in enumerate(names)]
    (run / RAY_SNAPSHOT).write_text(
        json.dumps(
            {
                "ray_version": "2.60.0",
                "checkpoint_results": res,
                "checkpoint_report_indices": list(range(1, len(res) + 1)),
                "latest_checkpoint_result": res[-1],
                "pending_training_results": [res[-1]],
                "pending_validation_specs": [False],
                "current_report_index": len(res) + 1,
                "validated_checkpoint_dir_names": [names[0]],
                "timed_out_validation_checkpoint_dir_names": [],
                "failed_validation_checkpoint_dir_names": [],
            }
        )
    )


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "runs" / "r"
    for step in (4, 8, 12):
        _checkpoint(run, step)
    _snapshot(run, ["step_00000004", "step_00000008", "step_00000012"])
    return run


def test_a_checkpoint_is_named_by_its_folder_or_its_step(run, monkeypatch):
    want = str(run / "step_00000004")
    monkeypatch.chdir(run.parent.parent)
    for arg in (want, "runs/r/step_00000004/", "step_00000004", "step_4", "4"):
        assert find_checkpoint(arg, str(run)) == want, arg


def test_bad_checkpoints_are_errors_that_name_them(run, tmp_path):
    other = _checkpoint(tmp_path / "runs" / "other", 4)
    with pytest.raises(
        CheckpointError,
        match=r"--resume-from .*other/step_00000004: not a checkpoint of run .*/r; "
        r"its checkpoints: step_00000004, step_00000008, step_00000012",
    ):
        find_checkpoint(str(other), str(run))
    with pytest.raises(CheckpointError, match=r"no checkpoint .*step_00000005 \(the run's checkpoints: step_00000004"):
        find_checkpoint("step_5", str(run))
    (run / "step_00000008" / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000008 is incomplete: rng_rank0.pt missing"):
        find_checkpoint("8", str(run))
    states = run / "step_00000012" / "model" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-40])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"step_00000012/model/mp_rank_00_model_states.pt is truncated or corr"):
        find_checkpoint(str(run / "step_00000012"), str(run))
    (run / "step_00000004" / "megaray.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000004 is not a complete megaray checkpoint \(no megaray.json"):
        find_checkpoint("step_4", str(run))
    assert sorted(p.name for p in run.iterdir()) == [RAY_SNAPSHOT, "step_00000004", "step_00000008", "step_00000012"]


def test_branching_moves_the_later_checkpoints_aside_and_rewrites_rays_record(run):
    fork = branch(find_checkpoint("step_4", str(run)), str(run), now=0)
    aside = run / "branches" / "19700101-000000-after-step_00000004"
    assert fork.step == 4 and fork.aside == str(aside)
    assert sorted(p.name for p in aside.iterdir()) == ["old-step_00000008", "old-step_00000012"]
    assert (aside / "old-step_00000012" / "megaray.json").is_file()  # intact
    assert fork.moved == [
        (str(run / "step_00000008"), str(aside / "old-step_00000008")),
        (str(run / "step_00000012"), str(aside / "old-step_00000012")),
    ]
    assert latest_local(str(run))[0] == run / "step_00000004"  # what the workers restore
    snap = json.loads((run / RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["step_00000004"]
    assert snap["checkpoint_report_indices"] == [1] and snap["current_report_index"] == 4
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000004"
    assert snap["pending_training_results"] == [] and snap["pending_validation_specs"] == []
    assert snap["validated_checkpoint_dir_names"] == ["step_00000004"]
    assert "step_00000008, step_00000012" in fork.describe()


def test_a_branch_point_ray_never_registered_is_added_to_its_record(run):
    _snapshot(run, ["step_00000008", "step_00000012"])  # step 4 persisted, then the run died
    branch(str(run / "step_00000004"), str(run))
    snap = json.loads((run / RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["step_00000004"]
    assert snap["checkpoint_results"][0]["metrics"] == {"loss": 0.25}
    assert snap["checkpoint_report_indices"] == [3] and snap["current_report_index"] == 4
    shutil.rmtree(run / "step_00000004")  # the newest: nothing to move, nothing in the way
    fork = branch(str(_checkpoint(run, 4)), str(run))
    assert fork.moved == [] and fork.aside is None


# ----------------------------------------------------------------------------- end to end


def _losses(prefix: Path) -> dict:
    """``{step: loss}`` of rank 0's trace."""
    return {r["step"]: r["loss"] for r in read_trace(prefix)}


@pytest.mark.slow
def test_resume_from_step_4_branches_the_run_exactly_and_a_re_run_continues_the_branch(
    ray_cluster, text_shards, tmp_path, monkeypatch
):
    """12 steps, a checkpoint every 4; ``--resume-from`` step 4 (the branch crashes right after its
    step-8 checkpoint), then the plain command again: it resumes at the branch's step 8, not at the
    abandoned step 12; every step after 4 has the original run's loss; one MLflow run, tagged."""
    from conftest import REPO
    from mlflow.tracking import MlflowClient

    from megaray.families import load_config
    from megaray.train.launch import fit

    db = tmp_path / "mlflow.db"
    sets = [
        "name=fork",
        f"data.shards={text_shards}",
        f"scaling.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{db}",
        "train.max_steps=12",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.eval_every=1000",
        "scaling.num_workers=1",
        "scaling.num_to_keep=5",
        "scaling.max_failures=0",
        "train.zero_stage=0",
        "data.num_val_batches=1",
        "eval.sample_tokens=0",
        "tracking.system_metrics_interval_s=0",
        "tracking.log_model=false",
    ]
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", sets)
    run = tmp_path / "runs" / "fork"
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "trunk"))
    first = fit(cfg)
    reference = _losses(tmp_path / "trunk")
    assert sorted(reference) == list(range(1, 13))

    with pytest.raises(CheckpointError, match="not a checkpoint of run"):  # before Ray: nothing moved
        fit(cfg, resume_from=str(tmp_path / "elsewhere" / "step_00000004"))
    from typer.testing import CliRunner

    from megaray.cli import app

    out = CliRunner().invoke(
        app,
        [
            "train",
            str(REPO / "configs" / "gpt_debug.yaml"),
            "--resume-from",
            "step_5",
            *[a for kv in sets for a in ("--set", kv)],
        ],
    )
    assert out.exit_code == 2 and "error: --resume-from step_5: no checkpoint" in out.output, out.output
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "branch"))
    monkeypatch.setenv("MEGARAY_FAULT_AT_STEP", "8")
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg, resume_from=str(run / "step_00000004"))
    [aside] = (run / "branches").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["old-step_00000008", "old-step_00000012"]
    branch_losses = _losses(tmp_path / "branch")
    assert sorted(branch_losses) == [5, 6, 7, 8]

    monkeypatch.delenv("MEGARAY_FAULT_AT_STEP")
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "rerun"))
    result = fit(cfg)  # the plain command
    starts = [json.loads(x) for x in Path(f"{tmp_path / 'rerun'}.starts.rank0").read_text().splitlines()]
    assert [s["step"] for s in starts] == [8]  # the branch's step 8 (the abandoned step 12 would train nothing)
    rerun = _losses(tmp_path / "rerun")
    assert sorted(rerun) == [9, 10, 11, 12]
    got = {**branch_losses, **rerun}
    assert [got[s] for s in range(5, 13)] == pytest.approx([reference[s] for s in range(5, 13)], abs=1e-6)
    assert result.checkpoint == str(run / "step_00000012") and result.metrics["step"] == 12

    assert result.mlflow_run_id == first.mlflow_run_id  # the same MLflow run throughout
    client = MlflowClient(f"sqlite:///{db}")
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["megaray.resumed_from"] == str(run / "step_00000004") and tags["megaray.branch_step"] == "4"
    assert tags["megaray.abandoned_branch"] == str(aside)
    exp = client.get_run(result.mlflow_run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{result.mlflow_run_id}'")
    old = {m.name: m.tags["megaray.checkpoint"] for m in models if m.tags.get("megaray.branch") == "abandoned"}
    assert old["fork-step_00000012"] == str(aside / "old-step_00000012")  # models:/ of the old branch still load
    assert "resumed from" in (run / "log.txt").read_text()


def test_branching_on_s3_moves_through_the_object_store(run, tmp_path, monkeypatch):
    """The same branch on ``s3://`` storage (moto's S3 server on loopback): checked through pyarrow's
    S3 filesystem, the later checkpoints copied aside then deleted, Ray's record rewritten."""
    pytest.importorskip("moto")
    import boto3
    import pyarrow.fs as pafs
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket="bkt")
        s3, _ = pafs.FileSystem.from_uri("s3://bkt")
        pafs.copy_files(str(run), "bkt/runs/r", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
        uri = "s3://bkt/runs/r"
        with pytest.raises(CheckpointError, match=r"no checkpoint s3://bkt/runs/r/step_00000005"):
            find_checkpoint("5", uri)
        fork = branch(find_checkpoint("s3://bkt/runs/r/step_00000004/", uri), uri, now=0)
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bkt")["Contents"])
        aside = "runs/r/branches/19700101-000000-after-step_00000004"
        assert not [k for k in keys if k.startswith(("runs/r/step_00000008", "runs/r/step_00000012"))]
        assert f"{aside}/old-step_00000012/megaray.json" in keys and f"{aside}/old-step_00000008/rng_rank0.pt" in keys
        assert fork.aside == f"s3://{aside.replace('runs/', 'bkt/runs/', 1)}"
        snap = json.loads(client.get_object(Bucket="bkt", Key=f"runs/r/{RAY_SNAPSHOT}")["Body"].read())
        assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000004"
    finally:
        server.stop()
