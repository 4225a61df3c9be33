"""The main job end to end: Ray Data -> Ray Train (2 CPU workers) + DeepSpeed -> checkpoints + MLflow.

Real local Ray cluster, real DeepSpeed engines, a real ``mlflow server`` process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import crash_then_rerun, read_trace

from megaray.families import load_config
from megaray.train.reporter import GOODPUT, time_key
from megaray.train.stragglers import FIELDS, RANK_KEY, SLOW_RANK_KEY

pytestmark = pytest.mark.slow


def _cfg(text_shards, tmp_path, name, *extra):
    return load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            f"name={name}",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


def test_two_worker_zero2_run_is_tracked_in_a_real_mlflow_server(
    ray_cluster, text_shards, mlflow_server, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from megaray.train.launch import fit

    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "zero2"))
    monkeypatch.setenv("MEGARAY_SLOW_RANK", "1:0.3")  # a straggler: rank 1 sleeps 0.3 s after every step
    cfg = _cfg(
        text_shards,
        tmp_path,
        "zero2",
        f"tracking.tracking_uri={mlflow_server}",
        "train.max_steps=30",
        "train.lr=3e-3",
        "train.eval_every=10",
        "train.checkpoint_every=15",
        "train.log_every=5",
        "train.zero_stage=2",
        "eval.sample_tokens=8",
        "tracking.system_metrics_interval_s=1",
    )
    result = fit(cfg)

    # three evaluations, one Ray Data execution of the validation split per worker
    for rank in (0, 1):
        evals = [json.loads(x) for x in Path(f"{tmp_path / 'zero2'}.evals.rank{rank}").read_text().splitlines()]
        assert [(e["step"], e["val_reads"]) for e in evals] == [(10, 1), (20, 1), (30, 1)]

    assert result.metrics["step"] == 30
    ckpt = Path(result.checkpoint)
    assert ckpt.name == "step_00000030"
    assert json.loads((ckpt / "megaray.json").read_text())["step"] == 30
    assert (ckpt / "model.pt").is_file() and (ckpt / "tokenizer.json").is_file()
    assert (ckpt / "model").is_dir()  # DeepSpeed engine state (module + ZeRO optimizer shards)
    assert len(list(ckpt.glob("model/*optim_states.pt"))) == 2  # one ZeRO-2 shard per rank

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == str(cfg.model.n_layer)
    assert run.data.params["train.zero_stage"] == "2"
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "throughput",
        "data_wait_frac",
        "val_loss",
        "val_ppl",
        GOODPUT,
        time_key("startup"),
        time_key("eval"),
        time_key("checkpoint"),
        time_key("step"),
    ):
        assert key in run.data.metrics, key
    m = run.data.metrics
    t = {b: m[time_key(b)] for b in ("startup", "eval", "checkpoint", "step", "wall")}
    assert 0 < m[GOODPUT] < 1 and 0 < t["startup"] < t["wall"]
    assert t["eval"] > 0 and t["checkpoint"] > 0  # three evals, a checkpoint at 15
    assert t["step"] + t["eval"] + t["startup"] < t["wall"] * 1.01
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 6
    assert loss[-1] < loss[0] - 0.5, loss  # it learns
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [10, 20, 30]
    assert run.data.metrics["val_ppl"] == pytest.approx(math.exp(run.data.metrics["val_loss"]), rel=1e-4)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "sample", "final_checkpoint.txt"} <= arts
    cfg_arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/resolved.yaml", "config/tokenizer.json"} <= cfg_arts
    assert run.data.tags["megaray.final_checkpoint"] == result.checkpoint

    # train.stragglers: per-rank timings at every logged step, the slow rank named within 20 steps
    for r in (0, 1):
        for name in FIELDS:
            steps = [x.step for x in client.get_metric_history(run.info.run_id, RANK_KEY.format(rank=r, name=name))]
            assert sorted(steps) == [5, 10, 15, 20, 25, 30], (r, name, steps)
    busy, wait = (RANK_KEY.format(rank=r, name=n) for r, n in ((1, "busy_s"), (0, "wait_s")))
    assert m[busy] > m[RANK_KEY.format(rank=0, name="busy_s")] + 0.2 and m[wait] > 0.2  # rank 0 waits for it
    assert m[RANK_KEY.format(rank=0, name="forward_s")] > 0
    slow = sorted(client.get_metric_history(run.info.run_id, SLOW_RANK_KEY), key=lambda x: x.step)
    named = [x.step for x in slow if x.value == 1]
    assert named and named[0] <= 20, [(x.step, x.value) for x in slow]
    console = (tmp_path / "runs" / "zero2" / "log.txt").read_text()
    line = next((x for x in console.splitlines() if "straggler: rank 1 (host " in x), None)
    assert line is not None and " busy " in line, console[-3000:]
    # system metrics of every node, keyed by node (one node here, the slow rank's): system/<host>-<node id>/...
    keyed = [k for k in m if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")]
    assert len(keyed) == 1 and keyed[0].count("/") == 2, sorted(k for k in m if k.startswith("system/"))
    assert f"node {keyed[0].split('/')[1]})" in line, (line, keyed)


def _losses(uri: str, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss")}


@pytest.mark.parametrize("stage", [1])  # ZeRO 0, 2, 3 across sizes: tests/test_universal_checkpoint.py (no Ray)
def test_resume_after_a_crash_at_another_world_size_continues_exactly(ray_cluster, tmp_path, monkeypatch, stage):
    """A 2-worker ZeRO run (global batch 12 = 2 workers x micro-batch 2 x accum 3) on a small corpus
    (many row groups) crashes right after a checkpoint at 90% of its first epoch; the same command
    re-run on 3 workers (accum 2; the ZeRO state converted to DeepSpeed's universal form) continues
    at the next step with the scheduled lr, across the epoch boundary, in the same MLflow run, reading
    from its cursor (no replay), with the per-step losses of a 2-worker run that never crashed
    (within 1e-4: only the float reduction order differs), and every sample of the epoch trained
    exactly once."""
    from mlflow.tracking import MlflowClient

    from megaray.data.order import BatchPlan
    from megaray.data.text import load_manifest, num_windows, prepare_text
    from megaray.train.launch import fit
    from megaray.train.schedule import lr_factor

    shards = str(tmp_path / "small")
    prepare_text(["stdlib"], shards, vocab_size=512, val_fraction=0.25, rows_per_group=4, stdlib_max_docs=60)
    plan = BatchPlan(num_windows(load_manifest(shards), 64), 12, 2)  # gpt debug: block 64
    spe = plan.steps_per_epoch
    crash, total = max(2, round(spe * 0.9)), spe + 3
    assert 5 <= spe <= 30, spe  # a short epoch: the run crosses its boundary
    cfg = _cfg(
        shards,
        tmp_path,
        "crash",
        f"train.max_steps={total}",
        f"train.checkpoint_every={crash}",
        f"train.eval_every={total}",
        "train.log_every=1",
        "train.warmup_steps=4",
        f"train.zero_stage={stage}",
        "data.batch_size=2",
        "train.global_batch_size=12",
        "scaling.num_workers=2",
        "scaling.max_failures=0",
        "eval.sample_tokens=0",
        "data.num_val_batches=1",
    )
    bigger = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 3})})
    result = crash_then_rerun(monkeypatch, cfg, tmp_path / "crash", crash, rerun=bigger)
    assert result.metrics["step"] == total

    t = cfg.train
    steps = list(range(1, total + 1))
    got = [r for rank in (0, 1, 2) for r in read_trace(tmp_path / "crash", rank)]
    # rank 1 of the crashed group may have trained micro-batches of step crash + 1 (no collective
    # before its accumulation boundary) before the group was torn down: not a step of the run
    crashed_pids = {r["pid"] for r in got if r["step"] <= crash}
    got = [r for r in got if r["step"] <= crash or r["pid"] not in crashed_pids]
    assert sorted({r["step"] for r in got}) == steps  # resumed at crash + 1: nothing retrained, nothing skipped
    assert {r["world"] for r in got if r["step"] <= crash} == {2} and {
        r["world"] for r in got if r["step"] > crash
    } == {3}
    assert all(r["replayed"] == 0 for r in got)  # the re-run started reading at its cursor
    for epoch in (0, 1):  # every served sample of epoch 0 exactly once; epoch 1 from its start
        ids = sorted(i for r in got if r["epoch"] == epoch for i in r["ids"])
        assert ids == list(range(plan.served if epoch == 0 else (total - spe) * 12))
    expected = {s: t.lr * lr_factor(s - 1, t.warmup_steps, t.max_steps, t.min_lr / t.lr) for s in steps}
    assert {r["step"]: r["lr"] for r in got} == pytest.approx(expected)  # the LR schedule continues
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("megaray").experiment_id
    runs = client.search_runs([exp], filter_string="tags.`megaray.run_key` LIKE '%/crash'")
    assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id  # same MLflow run
    crashed = _losses(uri, result.mlflow_run_id)
    assert sorted(crashed) == steps
    sizes = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "world_size")}
    assert sizes[crash] == 2 and sizes[total] == 3  # the size change is in the run's charts
    accum = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "grad_accum_steps")}
    assert accum[crash] == 3 and accum[total] == 2

    # a third run of the same command has nothing to train: it hands back the final report
    # (what a Tune trial restarted after finishing needs) and logs nothing new
    again = fit(bigger)
    assert again.metrics["step"] == total and again.checkpoint == result.checkpoint
    assert again.metrics["val_loss"] == pytest.approx(result.metrics["val_loss"])
    assert sorted({r["step"] for r in read_trace(tmp_path / "crash", 0)}) == steps  # no batch trained

    # the same run on 2 workers without the crash: the same global batches and per-step losses
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "whole"))
    whole = fit(cfg.model_copy(update={"name": "whole"}))
    reference = _losses(uri, whole.mlflow_run_id)
    assert [crashed[s] for s in steps] == pytest.approx([reference[s] for s in steps], abs=1e-4)
    ref = [r for rank in (0, 1) for r in read_trace(tmp_path / "whole", rank)]
    for step in steps:  # each optimizer step trained on the same sample ids at 2 and at 3 workers
        assert sorted(i for r in ref if r["step"] == step for i in r["ids"]) == sorted(
            i for r in got if r["step"] == step for i in r["ids"]
        )


def test_a_hung_rank_is_dumped_and_the_group_restarts_from_its_checkpoint(
    ray_cluster, text_shards, tmp_path, monkeypatch
):
    """The golden debug-GPT run (tests/test_golden_losses.py: 1 worker x micro-batch 4) on 2 workers x
    micro-batch 2 (the same global batches), checkpointing at step 10. Rank 1 hangs at step 12's first
    micro-batch (``MEGARAY_HANG_AT_STEP``); rank 0 blocks in step 12's collective. The watchdog
    (``train.watchdog``, step floor 5 s) dumps the stuck rank's stacks into the run folder, tells the
    driver's console and stops its process; Ray Train restarts the group once, from step 10, and the run
    ends at step 20 with the per-step losses of the stored uninterrupted run. The dump is logged to the
    MLflow run. (It replaces a test that SIGKILLed a worker from outside: the same recovery.)"""
    from mlflow.tracking import MlflowClient
    from test_golden_losses import ASSETS, CASES, COMMON

    from megaray.train.launch import fit

    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "hang"))
    monkeypatch.setenv("MEGARAY_HANG_AT_STEP", "1:12")
    case = CASES["gpt_debug"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    timeout_s = 5.0
    cfg = load_config(
        REPO / "configs" / case.config,
        [
            "name=hang",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri={uri}",
            *COMMON,
            *case.overrides,
            "scaling.num_workers=2",
            "data.batch_size=2",
            "train.global_batch_size=4",
            "train.checkpoint_every=10",
            "scaling.max_failures=1",
            f"train.watchdog.step_timeout_s={timeout_s}",
        ],
    )
    t0 = time.time()
    result = fit(cfg)
    assert result.metrics["step"] == 20
    assert time.time() - t0 < 600  # a generous deadline: the hang cost one timeout and one restart

    # one restart of the group, from the checkpoint the first attempt wrote at step 10; steps 11-20 once
    for rank in (0, 1):
        recs = read_trace(tmp_path / "hang", rank)
        new = [i for i in range(1, len(recs)) if recs[i]["pid"] != recs[i - 1]["pid"]]
        assert len(new) == 1, f"rank {rank}: expected exactly one restart of the worker group"
        i = new[0]
        assert [r["step"] for r in recs[:i]] == list(range(1, 12)), "the first attempt trains steps 1-11"
        assert [r["step"] for r in recs[i:]] == list(range(11, 21)), "the restart resumes at step 10's checkpoint"
        first, again = recs[i - 1], recs[i]
        assert first["fp"] == again["fp"] and first["loss"] == again["loss"]  # step 11 again, bit for bit

    # the stuck rank's dump: header, and the hook's frame in its stacks; the console line on the driver
    folder = tmp_path / "runs" / "hang" / "watchdog"
    dumps = {p.name: p.read_text() for p in folder.glob("*.txt")}
    (name,) = [n for n in dumps if n.startswith("rank1-")]  # rank 0, stuck in the collective, may dump too
    head = dumps[name].splitlines()[0]
    assert head.startswith("watchdog: rank 1 (") and " stuck in step 12 for " in head, head
    assert f"train.watchdog.step_timeout_s={timeout_s:g}" in head and str(folder / name) in head
    assert "hang_here_forever" in dumps[name] and "extras.py" in dumps[name]
    assert head in (tmp_path / "runs" / "hang" / "log.txt").read_text()
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(result.mlflow_run_id, "watchdog")}
    assert {f"watchdog/{n}" for n in dumps} <= logged
    # the restart's cost: from the dump (the hang + the timeout) to the restarted group's first micro-batch
    print(f"restart cost: {again['t'] - (folder / name).stat().st_mtime:.1f}s after the {timeout_s:g}s timeout")

    # per-step losses: those of the uninterrupted run (the last value logged at each step). 2 workers differ
    # from the stored 1-worker curve only in the order of the gradient sum: 1.5e-7 at most, measured in 3 runs
    # on an AMD EPYC (one with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_CBWR=COMPATIBLE); the
    # stored curve's own spread across processors is 1.6e-7 (test_golden_losses.py): 3x their sum, 1e-6
    history = sorted(client.get_metric_history(result.mlflow_run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    got = [v for _, v in sorted({m.step: m.value for m in history}.items())]
    want = json.loads((ASSETS / "gpt_debug.json").read_text())["metrics"]["loss"]
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want)]
    print(f"largest relative difference from the stored 1-worker curve: {max(rel):.1e}")
    assert len(got) == 20 and max(rel) < 1e-6, [f"step {i}: {g} vs {w}" for i, (g, w) in enumerate(zip(got, want), 1)]


def _corrupt_data_pages(shard: Path) -> None:
    """Overwrite every byte between the leading magic and the footer of a parquet file: the
    footer still parses (the driver's up-front check passes), decoding any page fails."""
    import struct

    data = bytearray(shard.read_bytes())
    footer = struct.unpack("<I", bytes(data[-8:-4]))[0]
    end = len(data) - 8 - footer
    data[4:end] = b"\xff" * (end - 4)
    shard.write_bytes(bytes(data))


def test_data_error_inside_a_worker_ends_the_run_at_once_with_its_message(
    ray_cluster, text_shards, tmp_path, monkeypatch
):
    """A corrupt data page is found only when a worker reads it: the DataError naming the shard
    and row group ends the run without the 2 retries max_failures allows, and fit() raises it."""
    import shutil

    from megaray.errors import DataError
    from megaray.train.launch import fit

    shards = tmp_path / "shards"
    shutil.copytree(text_shards, shards)
    first = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]
    _corrupt_data_pages(shards / first)
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "bad"))
    cfg = _cfg(
        str(shards), tmp_path, "bad-data", "train.max_steps=4", "scaling.max_failures=2", "tracking.enabled=false"
    )
    t0 = time.time()
    # (the train stream reads the row groups in a per-epoch seeded order: any of them may come first)
    with pytest.raises(DataError, match=rf"(?s){first}: row group \d+ is corrupt .*data.on_corrupt=skip$"):
        fit(cfg)  # the message ends with what to do (Ray Data's note on its own retries is cut)
    for rank in (0, 1):  # one attempt: each rank's worker started once
        assert len(Path(f"{tmp_path / 'bad'}.starts.rank{rank}").read_text().splitlines()) == 1
    assert not read_trace(tmp_path / "bad", 0)  # no batch was trained on
    assert time.time() - t0 < 240


@pytest.mark.parametrize("stage", [3])  # 0: the kill test; 1: the resume test; 2: the MLflow-server test
def test_zero_stage_trains_and_checkpoints(ray_cluster, text_shards, tmp_path, stage):
    import torch

    from megaray.train.checkpoint import load_for_inference
    from megaray.train.launch import fit

    cfg = _cfg(
        text_shards,
        tmp_path,
        f"zero{stage}",
        f"train.zero_stage={stage}",
        "train.max_steps=4",
        "train.checkpoint_every=3",
        "train.eval_every=4",
        "train.log_every=2",
        "tracking.enabled=false",
    )
    result = fit(cfg)
    assert result.metrics["step"] == 4
    # a checkpoint step that is not a logging step still checkpoints; the last step always does
    assert sorted(p.name for p in (tmp_path / "runs" / f"zero{stage}").glob("step_*")) == [
        "step_00000003",
        "step_00000004",
    ]
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["val_loss"])
    model, loaded, _ = load_for_inference(result.checkpoint)
    assert loaded.train.zero_stage == stage
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, cfg.model.vocab_size) and torch.isfinite(logits).all()
