"""An autoscaling Ray cluster on this one machine: Ray's fake multi-node provider.

``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1`` runs the autoscaler
(v1) with the ``fake_multinode`` provider, which "launches" a node by starting another raylet
on this machine. The head offers one ``trainer`` slot (a custom resource every Train worker
asks for); worker nodes offer one each. Each test starts a bare cluster of its own:

1. an elastic run (``scaling.num_workers: [1, 3]``) on the bare cluster starts with the one slot
   there is, grows to three at a checkpoint once the autoscaler has added two nodes, goes on with
   two when a worker node is killed, and grows back to three when a node joins (by hand: the
   fake provider keeps the killed node in its books and never replaces it);
2. ``ray job submit`` (runtime env ``cluster/runtime_env.yaml``) of ``megaray train`` with two
   workers cannot start on the head alone: the autoscaler adds a node and the job succeeds.

The wheel has no ``fake_multi_node/example.yaml`` (which ``ray.cluster_utils.AutoscalingCluster``
reads), so the full config is built here from Ray's example. ``AutoscalingCluster.start`` also
runs ``ray stop --force``, which would kill every Ray on a shared machine: this module starts
and stops only its own processes (by GCS port). Marker ``cluster``: ``make test-cluster``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port
from helpers import ray_start, ray_stop, read_trace

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
#: head node: 2 CPUs (Ray Data, the job driver) and one Train worker slot
HEAD = {"CPU": 2, "trainer": 1}
WORKER = {"CPU": 2, "trainer": 1}
TRAIN_RESOURCES = "scaling.resources_per_worker={CPU: 1, trainer: 1}"


def fake_cluster_config(head: dict, max_nodes: int) -> dict:
    """The autoscaler config of Ray's ``fake_multi_node/example.yaml`` with our node types."""
    return {
        "cluster_name": "megaray-fake",
        "max_workers": max_nodes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": dict(head), "node_config": {}, "max_workers": 0},
            "ray.worker.trainer": {
                "resources": dict(WORKER),
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture
def fake_cluster(tmp_path_factory):
    """A fake autoscaling cluster (head + up to 2 worker nodes); yields ``(gcs address, dashboard URL)``
    with this process connected to it."""
    root = tmp_path_factory.mktemp("fake-cluster")
    config = root / "autoscaler.json"
    head = dict(HEAD)
    cfg = fake_cluster_config(head, max_nodes=2)
    cfg["provider"]["head_resources"] = dict(head)
    gcs, dash = free_port(), free_port()
    # the fake provider starts worker raylets against this address (default: <ip>:6379)
    from ray._private.services import get_node_ip_address

    cfg["provider"]["gcs_address"] = f"{get_node_ip_address()}:{gcs}"
    config.write_text(json.dumps(cfg))
    auth = os.environ.get("RAY_AUTH_MODE")
    # Token auth off for this throwaway local cluster: the fake provider's node launcher (inside
    # the autoscaler monitor) connects to the GCS without the token and times out otherwise
    # ("Failed to connect to GCS", observed with RAY_AUTH_MODE=token). Real clusters keep it on
    # (cluster/*: docs/cluster.md).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    env.pop("RAY_ADDRESS", None)
    ray_start(
        BIN,
        "--head",
        f"--autoscaling-config={config}",
        f"--num-cpus={head.pop('CPU')}",
        f"--resources={json.dumps(head)}",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        env=env,
    )
    try:
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    finally:
        ray_stop(gcs)
        os.environ.pop("RAY_AUTH_MODE") if auth is None else os.environ.__setitem__("RAY_AUTH_MODE", auth)


def _alive_nodes(gcs: str) -> int:
    """Alive nodes, asked from a fresh process (Ray reads RAY_AUTH_MODE when it is imported, and
    this process imported it before the token mode was set)."""
    code = (
        f"import ray; ray.init(address='{gcs}', log_to_driver=False); "
        "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    found = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ALIVE ")]  # raylet lines too
    return int(found[-1]) if out.returncode == 0 and found else 0


def _submit(dashboard: str, *args: str, gcs: str) -> tuple[str, int, int]:
    """``ray job submit`` of ``megaray train`` (runtime env ``cluster/runtime_env.yaml``); returns
    (output, exit code, most alive nodes seen while it ran)."""
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        dashboard,
        "--working-dir",
        str(REPO),
        "--runtime-env",
        str(REPO / "cluster" / "runtime_env.yaml"),
        "--",
        *args,
    ]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    most = 1
    for _ in range(40):  # the dashboard's job agent comes up a little after `ray start` returns
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        while job.poll() is None:
            most = max(most, _alive_nodes(gcs))
            time.sleep(2)
        out = job.stdout.read()
        if "No available agent" not in out:
            return out, job.returncode, most
        time.sleep(3)
    return out, job.returncode, most


#: the elastic run's ``scaling.elastic_resize_s`` (Ray's ``elastic_resize_monitor_interval_s``)
RESIZE_S = 20


def _kill_a_worker_node(trace: Path) -> int:
    """Kill the raylet of a worker node (not the head) that hosts a Train worker of the running
    group, as a lost spot node would; returns the killed raylet's pid. A Train worker is a child
    process of its node's raylet."""
    import psutil

    rows = read_trace(trace, 0, 1, 2)
    last = max(rows, key=lambda r: r["t"])
    pids = {r["pid"] for r in rows if r["world"] == last["world"] and r["t"] > last["t"] - 5}
    head = _head_raylet()
    for pid in sorted(pids):
        try:
            raylet = psutil.Process(pid).parent()
        except psutil.Error:
            continue
        if raylet is not None and "raylet" in raylet.name() and raylet.pid != head:
            raylet.kill()
            return raylet.pid
    raise AssertionError(f"no Train worker on a worker node among {pids}")


def _raylets() -> set:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}


def _add_worker_node(gcs: str) -> set:
    """A replacement node joins the cluster (``ray start --address``) with one Train slot, as the
    autoscaler's replacement of a lost spot node would (the fake provider keeps a killed node in
    its own books, so it never launches a replacement by itself). Returns the new raylet's pid(s):
    the autoscaler does not manage this node, so the test removes it when done."""
    before = _raylets()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    ray_start(
        BIN,
        f"--address={gcs}",
        f"--num-cpus={WORKER['CPU']}",
        f"--resources={json.dumps({'trainer': WORKER['trainer']})}",
        env=env,
    )
    return _raylets() - before


def _head_raylet() -> int:
    """The head's raylet: the oldest raylet process (``ray start --head`` started it first)."""
    import psutil

    raylets = [p for p in psutil.process_iter(["name", "create_time"]) if p.info["name"] == "raylet"]
    return min(raylets, key=lambda p: p.info["create_time"]).pid


def test_elastic_run_grows_shrinks_when_a_node_is_lost_and_grows_back(fake_cluster, text_shards, tmp_path):
    """``scaling.num_workers: [1, 3]`` with a global batch of 12 (micro-batch 2: every size divides
    it) on the bare cluster (one Train slot): it starts with one worker; Ray Train asks the
    autoscaler for three, which adds two nodes, and the run grows to three at its next checkpoint.
    Then a worker node is killed (a lost spot node): the run goes on with the two workers that fit,
    from its last checkpoint, without waiting for the node; a replacement node joins and the run
    grows back to three at its next checkpoint. One MLflow run; the same global batch
    throughout (the accumulation follows the size); no sample trained twice in the epoch.
    ``MEGARAY_STEP_SLEEP_S`` slows the steps so the cluster changes while the run trains."""
    from mlflow.tracking import MlflowClient

    gcs, dashboard = fake_cluster
    assert _alive_nodes(gcs) == 1  # the bare cluster: one trainer slot
    trace, db, steps = tmp_path / "trace", tmp_path / "db", 160
    done = {}
    args = [
        "env",
        f"MEGARAY_TRACE={trace}",
        "MEGARAY_STEP_SLEEP_S=0.4",
        "megaray",
        "train",
        "configs/gpt_debug.yaml",
        "--set",
        "name=elastic",
        "--set",
        f"data.shards={text_shards}",
        "--set",
        f"scaling.storage_path={tmp_path / 'runs'}",
        "--set",
        f"tracking.tracking_uri=sqlite:///{db}",
        "--set",
        "scaling.num_workers=[1, 3]",
        "--set",
        f"scaling.elastic_resize_s={RESIZE_S}",
        "--set",
        TRAIN_RESOURCES,
        "--set",
        "scaling.max_failures=4",
        "--set",
        "data.batch_size=2",
        "--set",
        "train.global_batch_size=12",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        f"train.eval_every={steps}",
        "--set",
        "train.log_every=10",
        "--set",
        "eval.sample_tokens=0",
    ]
    job = threading.Thread(target=lambda: done.update(zip(("out", "rc", "most"), _submit(dashboard, *args, gcs=gcs))))
    job.start()
    deadline = time.monotonic() + 600
    while (
        not any(r["world"] == 3 for r in read_trace(trace, 0, 1, 2)) and job.is_alive() and time.monotonic() < deadline
    ):
        time.sleep(2)
    assert any(r["world"] == 3 for r in read_trace(trace, 0, 1, 2)), "the run never grew to three workers"
    time.sleep(3)
    _kill_a_worker_node(trace)
    while (
        not any(r["world"] == 2 for r in read_trace(trace, 0, 1, 2)) and job.is_alive() and time.monotonic() < deadline
    ):
        time.sleep(2)
    joined = _add_worker_node(gcs)  # the run goes on with two; then the lost capacity comes back
    job.join(timeout=900)
    import psutil

    for pid in joined:  # not the autoscaler's node: it would never be removed as idle
        psutil.Process(pid).kill()
    out, rc = done.get("out", ""), done.get("rc")
    assert rc == 0 and "succeeded" in out, out[-4000:]

    rows = sorted(read_trace(trace, 0, 1, 2), key=lambda r: r["t"])
    # worker groups in start order (a group = the world size and the pids that trained with it)
    groups: list = []
    for r in rows:
        if groups and (r["pid"] in groups[-1][1] or (groups[-1][0] == r["world"] and r["t"] - groups[-1][2] < 2)):
            groups[-1][1].add(r["pid"])
            continue
        if not any(r["pid"] in g[1] for g in groups):
            groups.append([r["world"], {r["pid"]}, r["t"]])
    sizes = [g[0] for g in groups]
    assert sizes[0] == 1 and sizes[-1] == 3, sizes
    assert 2 in sizes[sizes.index(3) :], f"the run did not go on with two workers after the lost node: {sizes}"
    # each step as the run kept it: the last group that trained it (a restart retrains the steps
    # after its checkpoint that the lost group had trained)
    kept = {}
    for k, (_world, pids, _) in enumerate(groups):
        for r in rows:
            if r["pid"] in pids:
                kept.setdefault(r["step"], {})[k] = kept.get(r["step"], {}).get(k, []) + r["ids"]
    assert sorted(kept) == list(range(1, steps + 1))
    ids = [i for step in sorted(kept) for i in kept[step][max(kept[step])]]
    assert len(ids) == len(set(ids)) == steps * 12  # inside one epoch: no sample twice, none skipped
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("megaray").experiment_id])
    assert len(runs) == 1  # one MLflow run across every size change
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "world_size")}
    assert {1.0, 2.0, 3.0} <= set(history.values()), history


def test_job_submit_scales_the_cluster_up(fake_cluster, text_shards, tmp_path):
    gcs, dashboard = fake_cluster
    assert _alive_nodes(gcs) == 1
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    out, rc, most = _submit(
        dashboard,
        "megaray",
        "train",
        "configs/gpt_debug.yaml",
        "--set",
        "name=grow",
        "--set",
        f"data.shards={text_shards}",
        "--set",
        f"scaling.storage_path={storage}",
        "--set",
        f"tracking.tracking_uri=sqlite:///{db}",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.eval_every=6",
        "--set",
        "scaling.num_workers=2",
        "--set",
        TRAIN_RESOURCES,
        gcs=gcs,
    )
    assert rc == 0 and "succeeded" in out, out[-4000:]
    assert most >= 2, "the autoscaler added no node for the second Train worker"
    state = json.loads((storage / "grow" / "step_00000006" / "megaray.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2
