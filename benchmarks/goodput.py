"""Start-up and restart cost of the demo run, broken down; optionally the goodput of a short run.

**Start-up and restart** (the default; issue #22): ``megaray train configs/demo.yaml`` (the demo
model, 2 workers, ZeRO-2, MLflow on, to a fresh SQLite store) run as a subprocess, shortened to a
few steps, with the trace hook on (``MEGARAY_TRACE``) and a crash injected after step ``K``
(``MEGARAY_FAULT_AT_STEP=K``, ``scaling.max_failures=1``, a checkpoint at ``K``), so one run
gives both figures:

* ``startup``: ``time.time()`` just before the subprocess is started (the process start of the
  ``megaray train`` driver) to the end of the first trained optimizer step (rank 0's trace);
* ``restart``: the injected crash (rank 0, after step ``K``'s checkpoint) to the end of the next
  trained step of the restarted worker group.

Each is broken down into phases from three clocks: the driver's marks (``<trace>.driver``:
interpreter and CLI, checks, Ray start (with MLflow's warm-up beside it), the task's datasets
and info, the MLflow run, the trainer), Ray Train's controller log (its DEBUG lines in
``ray-train-sys-controller-*.log`` of the run's Ray session, found through ``RAY_TMPDIR``: the
controller's start, placement group, worker actors (process spawn, ``import ray``), the train
context (unpickling the driver's spec: ``import torch`` and megaray), ``torch.distributed``
init, the training function's launch) and each worker's marks (``<trace>.starts.rank0``,
:mod:`megaray.train.startup`: config, locate, the train stream, the modules, the DeepSpeed
engines, the restore, the rest of the set-up (MLflow logger, reporter, ...), then the first
batch and the first step from the per-step trace). A phase is the time from the previous mark to
its own; ``first_batch_wait_s`` is what the loop waited for the stream after its set-up. Beside
the clocks, ``cpu_s``: CPU seconds each kind of process (the driver, Ray's daemons, each actor
class, ``IDLE`` workers) used in the window, sampled every 0.5 s: the figure least moved by
other jobs on a shared machine. ``worker_process_age_at_fn_s``: how long rank 0's process
existed before the training function started.

**Goodput** (``--goodput``): the former benchmark, in-process: ``--steps`` optimizer steps with an
evaluation every ``--eval-every`` and a batch small enough that an epoch boundary falls inside,
tracking off: goodput, start-up, seconds per evaluation, data wait.

Prints one JSON object on stdout (each run's figures go to stderr as it ends): every run, the
per-phase medians, and whether they meet the targets (start-up <= 30 s, restart <= 20 s).
``--against DIR`` (a copy of the ``megaray`` package, e.g. taken before a change) runs that
copy and the current tree alternately in each repeat and adds the ``[against, current,
current / against]`` rows per phase, each repeat's pair ratio and their median (the fair
figure on a shared machine); ``--baseline FILE`` compares with an earlier output instead::

    mkdir -p /tmp/before && cp -r megaray /tmp/before/                        # before a change
    python benchmarks/goodput.py --repeats 3 --against /tmp/before            # ~3 min a repeat
    python benchmarks/goodput.py --repeats 3 > /tmp/now.json; python benchmarks/goodput.py --baseline /tmp/now.json
    python benchmarks/goodput.py --repeats 0 --goodput --steps 120 --eval-every 40
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
TARGETS = {"startup_s": 30.0, "restart_s": 20.0}  # issue #22, 2 cores


def load() -> float:
    """The 1-minute load average (the machine is shared: every figure carries it)."""
    return round(os.getloadavg()[0], 2)


# --- start-up and restart --------------------------------------------------------------------------


def run_demo(
    shards: str, work: Path, fault_at: int, steps: int, timeout_s: float, tree: Optional[str] = None
) -> Dict[str, Any]:
    """One ``megaray train configs/demo.yaml`` subprocess, crashing once after ``fault_at``; returns
    its clocks (the launch time, the driver's and workers' marks, the trace, the controller log,
    CPU samples). ``tree``: a folder holding another ``megaray`` package to run instead (first on
    ``PYTHONPATH``, so Ray's workers import it too)."""
    work.mkdir(parents=True)
    trace = str(work / "trace")
    ray_tmp = tempfile.mkdtemp(prefix="mgp", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    sets = [
        f"name=startup-{work.name}",
        f"data.shards={shards}",
        f"scaling.storage_path={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={fault_at}",
        f"train.eval_every={steps}",
        f"train.log_every={fault_at}",
        "scaling.max_failures=1",
    ]
    cmd = [sys.executable, "-m", "megaray.cli", "train", str(REPO / "configs" / "demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "MEGARAY_TRACE": trace, "MEGARAY_FAULT_AT_STEP": str(fault_at), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)  # a fresh local cluster, as `megaray train` on a laptop
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(tree).resolve()), env.get("PYTHONPATH")) if p)
    load_before = load()
    stdout, stderr = work / "stdout.txt", work / "stderr.txt"
    try:
        with open(stdout, "w") as out_f, open(stderr, "w") as err_f:
            t_launch = time.time()
            # its own process group: on a timeout the driver and the Ray cluster it started go together
            proc = subprocess.Popen(
                cmd, env=env, cwd=str(work), stdout=out_f, stderr=err_f, text=True, start_new_session=True
            )
            cpu = CpuSampler(proc.pid)
            try:
                code = proc.wait(timeout=timeout_s)
            finally:
                cpu.stop()
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            t_exit = time.time()
        if code != 0:
            raise SystemExit(
                f"megaray train failed (exit {code}):\n{stdout.read_text()[-3000:]}\n{stderr.read_text()[-3000:]}"
            )
        return {
            "launch": t_launch,
            "exit": t_exit,
            "load": [load_before, load()],
            "driver": _lines(f"{trace}.driver")[0],
            "starts": {r: _lines(f"{trace}.starts.rank{r}") for r in (0, 1)},
            "steps": {r: _lines(f"{trace}.rank{r}") for r in (0, 1)},
            "fault": _lines(f"{trace}.fault")[0],
            "controller": _controller_log(ray_tmp),
            "time_line": [line for line in stdout.read_text().splitlines() if "time:" in line],
            "cpu": cpu.samples,
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


class CpuSampler:
    """CPU seconds (user + system) of every process under ``pid`` (the driver, Ray's daemons and
    workers), sampled every ``interval_s`` by a thread: ``samples`` is ``[(time, {pid: [name, cpu_s]})]``.
    A process's name is its title (Ray's ``ray::RayTrainWorker``, ``ray::IDLE``, ...) when last seen."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        import threading

        self.pid, self.interval_s = pid, interval_s
        self.samples: List[Tuple[float, Dict[int, List[Any]]]] = []
        self._names: Dict[int, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            now, seen = time.time(), {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        title = (p.cmdline() or [p.name()])[0]
                except psutil.Error:
                    continue
                name = "driver" if p.pid == self.pid else _process_kind(title, p)
                seen[p.pid] = [name, round(t.user + t.system, 2)]
            self.samples.append((now, seen))
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _process_kind(title: str, p: Any) -> str:
    """A short kind for a Ray process from its title (``ray::SplitCoordinator.start_epoch`` ->
    ``SplitCoordinator``; ``.../gcs_server`` -> ``gcs_server``; a Python daemon by its script)."""
    if title.startswith("ray::"):
        return title[5:].split(".")[0].split("(")[0].split("[")[0].split(" ")[0] or "ray worker"
    base = os.path.basename(title)
    if base.startswith("python"):
        try:
            args = p.cmdline()
        except Exception:  # noqa: BLE001
            args = []
        script = next((a for a in args[1:] if a.endswith(".py") or a.startswith("-m")), base)
        return os.path.basename(script)
    return base


def cpu_until(samples: List[Tuple[float, Dict[int, List[Any]]]], t0: float, t1: float) -> Dict[str, float]:
    """CPU seconds each kind of process used between ``t0`` and ``t1`` (the nearest samples), largest
    first, with ``total``; a process that ended meanwhile counts up to its last sample."""
    before = [s for s in samples if s[0] <= t0]
    start = before[-1][1] if before else {}
    last: Dict[int, List[Any]] = {}
    for t, seen in samples:
        if t > t1:
            break
        last.update(seen)
    used: Dict[str, float] = {}
    for pid, (name, cpu_s) in last.items():
        base = start.get(pid, [name, 0.0])[1]
        used[name] = used.get(name, 0.0) + max(0.0, cpu_s - base)
    out = {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    out["total"] = round(sum(used.values()), 1)
    return out


def _lines(path: str) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _controller_log(ray_tmp: str) -> List[Tuple[float, str]]:
    """``(time, message)`` of Ray Train's controller log lines (JSON, DEBUG and up) of the run's session."""
    rows = []
    for path in glob.glob(f"{ray_tmp}/ray/session_2*/logs/train/ray-train-sys-controller-*.log"):  # not session_latest
        for line in Path(path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rows.append((int(rec.get("timestamp_ns", 0)) / 1e9, str(rec.get("message", ""))))
    return sorted(rows)


#: Ray Train controller log messages (``ray/train/v2/_internal/execution/worker_group/worker_group.py``)
#: that end a phase of a worker group's start, in order
GROUP_PHASES = (
    ("controller_start_s", "Attempting to start training worker group"),
    ("placement_group_s", "[Worker Group Initialization] Placement group ready"),
    ("worker_actors_s", "worker actors created in"),
    ("train_context_s", "Train context initialized on workers"),
    ("backend_setup_s", "after_worker_group_start callbacks completed"),
    ("train_fn_launch_s", "Train function launched on workers"),
)
#: the worker's marks (megaray.train.startup), in order, after ``loop``
WORKER_PHASES = ("config", "locate", "task", "stream", "modules", "engines", "restore", "ready")


def _group_starts(controller: List[Tuple[float, str]]) -> List[Dict[str, Any]]:
    """Each worker group start in the controller log: ``{phase: end time}`` and the callback breakdown."""
    groups: List[Dict[str, Any]] = []
    for t, msg in controller:
        if GROUP_PHASES[0][1] in msg:
            groups.append({"ends": {}, "callbacks": {}})
        if not groups:
            continue
        for name, needle in GROUP_PHASES:
            if needle in msg and name not in groups[-1]["ends"]:
                groups[-1]["ends"][name] = t
        if "Individual callback time breakdown" in msg:
            for line in msg.splitlines():
                name, _, secs = line.strip().partition(": ")
                if secs.endswith("s") and name and name[0].isupper():
                    try:
                        groups[-1]["callbacks"][name] = round(float(secs[:-1]), 2)
                    except ValueError:
                        pass
    return groups


def _phases(t0: float, ends: List[Tuple[str, Optional[float]]]) -> Dict[str, float]:
    """``{name: seconds}`` from ``t0`` through successive ``(name, end time)`` (a missing end is skipped)."""
    out, prev = {}, t0
    for name, end in ends:
        if end is None:
            continue
        out[name] = round(end - prev, 2)
        prev = end
    return out


def _worker_part(start: Dict[str, Any], steps: List[Dict[str, Any]]) -> List[Tuple[str, Optional[float]]]:
    """The worker's phases (its marks), then the wait for the first batch and the first step."""
    m = start.get("marks", {})
    ends: List[Tuple[str, Optional[float]]] = [("train_fn_start_s", m.get("loop"))]
    ends += [(f"{name}_s", m.get(name)) for name in WORKER_PHASES]
    first = [s for s in steps if s["step"] == start["step"] + 1]
    if first:
        ends += [("first_batch_wait_s", first[0]["t"]), ("first_step_s", first[-1]["t_end"])]
    return ends


def breakdown(run: Dict[str, Any]) -> Dict[str, Any]:
    """``startup`` and ``restart`` totals and phases of one :func:`run_demo`."""
    d, groups = run["driver"], _group_starts(run["controller"])
    starts0, steps0 = run["starts"][0], run["steps"][0]
    g0 = groups[0] if groups else {"ends": {}, "callbacks": {}}
    ends: List[Tuple[str, Optional[float]]] = [
        ("interpreter_and_cli_s", d["fit"]),
        ("driver_checks_s", d["checks"]),
        ("ray_start_s", d["ray"]),
        ("task_info_s", d["datasets"]),
        ("mlflow_run_s", d["mlflow"]),
        ("trainer_s", d["trainer"]),
    ]
    ends += [(name, g0["ends"].get(name)) for name, _ in GROUP_PHASES]
    ends += _worker_part(starts0[0], steps0)
    startup = {
        "total_s": round(ends[-1][1] - run["launch"], 2),
        "process_spawn_s": round(d["process"] - run["launch"], 2),
        "phases": _phases(run["launch"], ends),
        "group_callbacks": g0["callbacks"],
        "worker_process_age_at_fn_s": round(starts0[0]["marks"]["loop"] - starts0[0]["marks"]["process"], 2),
        "cpu_s": cpu_until(run.get("cpu", []), run["launch"], ends[-1][1]),
    }
    out = {"startup": startup}
    if len(starts0) > 1 and len(groups) > 1:
        fault, g1 = run["fault"]["t"], groups[1]
        ends = [(name, g1["ends"].get(name)) for name, _ in GROUP_PHASES]
        ends[0] = ("failure_detect_and_teardown_s", ends[0][1])
        ends += _worker_part(starts0[1], steps0)
        restart = {
            "total_s": round(ends[-1][1] - fault, 2),
            "phases": _phases(fault, ends),
            "group_callbacks": g1["callbacks"],
            "worker_process_age_at_fn_s": round(starts0[1]["marks"]["loop"] - starts0[1]["marks"]["process"], 2),
            "worker_process_started_after_fault_s": round(starts0[1]["marks"]["process"] - fault, 2),
            "cpu_s": cpu_until(run.get("cpu", []), fault, ends[-1][1]),
        }
        out["restart"] = restart
    out["wall_s"] = round(run["exit"] - run["launch"], 1)
    out["load_1min"] = run["load"]
    return out


def _median(runs: List[Dict[str, Any]], key: str) -> Dict[str, Any]:
    """Per-phase medians of ``runs[*][key]``."""
    have = [r[key] for r in runs if key in r]
    if not have:
        return {}
    phases = {p for r in have for p in r["phases"]}
    first = have[0]["phases"]
    order = list(first) + sorted(phases - set(first))
    return {
        "total_s": round(statistics.median(r["total_s"] for r in have), 2),
        "each_total_s": [r["total_s"] for r in have],
        "phases": {p: round(statistics.median(r["phases"][p] for r in have if p in r["phases"]), 2) for p in order},
    }


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``runs``, their per-phase medians and whether the medians meet :data:`TARGETS`."""
    median = {"startup": _median(runs, "startup"), "restart": _median(runs, "restart")}
    return {
        "runs": runs,
        "median": median,
        "met": {
            "startup": median["startup"]["total_s"] <= TARGETS["startup_s"],
            "restart": bool(median["restart"]) and median["restart"]["total_s"] <= TARGETS["restart_s"],
        },
    }


def compare(now: Dict[str, Any], before: Dict[str, Any]) -> Dict[str, Any]:
    """``{figure: [before, after, after / before]}`` for the medians' totals and phases."""
    out: Dict[str, Any] = {}
    for key in ("startup", "restart"):
        a, b = now.get("median", {}).get(key), before.get("median", {}).get(key)
        if not a or not b:
            continue
        rows = {"total_s": [b["total_s"], a["total_s"], round(a["total_s"] / max(1e-9, b["total_s"]), 3)]}
        for p in list(b["phases"]) + [p for p in a["phases"] if p not in b["phases"]]:
            x, y = b["phases"].get(p), a["phases"].get(p)
            rows[p] = [x, y, round(y / x, 3) if x and y is not None else None]
        out[key] = rows
    return out


# --- goodput of a short run (in-process) -----------------------------------------------------------


def _cfg(shards: str, storage: str, name: str, steps: int, eval_every: int, batch_size: int, ckpt_every: int):
    from megaray.families import load_config

    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"name={name}",
            f"data.shards={shards}",
            f"scaling.storage_path={storage}",
            "tracking.enabled=false",
            f"train.max_steps={steps}",
            f"train.eval_every={eval_every}",
            f"train.checkpoint_every={ckpt_every}",
            f"train.log_every={max(1, eval_every // 2)}",
            f"data.batch_size={batch_size}",
            "train.warmup_steps=5",
        ],
    )


def goodput(shards: str, storage: str, steps: int, eval_every: int) -> Dict[str, Any]:
    from megaray.data.text import load_manifest, num_windows
    from megaray.train.launch import ensure_ray, fit
    from megaray.train.reporter import GOODPUT, time_key

    ensure_ray()
    batch = 4
    cfg = _cfg(shards, storage, "goodput", steps, eval_every, batch, steps)
    epoch_steps = num_windows(load_manifest(shards), cfg.model.block_size) // (cfg.scaling.num_workers * batch)
    m = fit(cfg, console=False).metrics
    return {
        "steps": steps,
        "epoch_steps": epoch_steps,
        "batch_size": batch,
        "goodput": round(m[GOODPUT], 4),
        "startup_s": round(m[time_key("startup")], 2),
        "eval_s_each": round(m[time_key("eval")] / max(1, steps // eval_every), 2),
        "wall_s": round(m[time_key("wall")], 1),
        "data_wait_s": round(m[time_key("data_wait")], 2),
        "checkpoint_s": round(m[time_key("checkpoint")], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="start-up/restart runs (medians); 0: none")
    ap.add_argument("--fault-at", type=int, default=3, help="the step after which the injected crash comes")
    ap.add_argument("--baseline", help="an earlier output of this script: adds after/before ratios")
    ap.add_argument(
        "--against",
        metavar="DIR",
        help="a folder holding another copy of the megaray package (e.g. a copy of megaray/ made before a "
        "change): each repeat runs it and the current tree, alternating which goes first, and adds "
        "current/against ratios (fair on a shared machine: both sides see the same load)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders (traces, logs)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per demo run")
    ap.add_argument("--goodput", action="store_true", help="also the goodput of a short run (in-process)")
    ap.add_argument("--steps", type=int, default=120, help="--goodput: optimizer steps")
    ap.add_argument("--eval-every", type=int, default=40, help="--goodput: steps between evaluations")
    ap.add_argument(
        "--docs",
        type=int,
        default=1000,
        help="stdlib documents in the corpus (1000: an epoch of ~75 steps at batch 4 x 2 workers)",
    )
    args = ap.parse_args()

    from megaray.data.text import prepare_text

    root = Path(tempfile.mkdtemp(prefix="megaray-goodput-"))
    shards = str(root / "data")
    prepare_text(
        ["stdlib"], shards, vocab_size=4096, val_fraction=0.1, stdlib_max_docs=args.docs, progress=False, verbose=False
    )
    out: Dict[str, Any] = {
        "benchmark": "goodput",
        "command": " ".join(["python", "benchmarks/goodput.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "load_1min_at_start": load()},
        "demo": {"config": "configs/demo.yaml", "workers": 2, "fault_at_step": args.fault_at, "mlflow": "sqlite"},
        "targets": TARGETS,
    }
    trees = {"current": None, **({"against": args.against} if args.against else {})}
    runs: Dict[str, List[Dict[str, Any]]] = {side: [] for side in trees}
    for i in range(args.repeats):
        for side in list(trees) if i % 2 == 0 else list(trees)[::-1]:  # alternate who goes first
            for attempt in range(2):  # once more after a failure (on a loaded machine Ray's start can time out)
                work = root / f"{side}{i}" if attempt == 0 else root / f"{side}{i}-retry"
                try:
                    raw = run_demo(shards, work, args.fault_at, args.fault_at + 2, args.timeout_s, trees[side])
                    break
                except (SystemExit, subprocess.TimeoutExpired, OSError) as e:
                    print(f"{side} run {i} failed ({str(e).splitlines()[-1] if str(e) else e!r})", file=sys.stderr)
            else:
                raise SystemExit(f"{side} run {i} failed twice: see {root}")
            runs[side].append(breakdown(raw))
            print(json.dumps({"side": side, "run": i, **runs[side][-1]}), file=sys.stderr, flush=True)
            if args.keep:
                (work / "raw.json").write_text(json.dumps(raw, default=str))
    if args.repeats:
        out.update(summary(runs["current"]))
    if args.against and args.repeats:
        out["against"] = {"tree": args.against, **summary(runs["against"])}
        out["vs_against"] = compare(out, out["against"])
        # each repeat's two runs ran back to back: their ratio sees the least of the machine's drift
        pairs = [
            {
                key: round(c[key]["total_s"] / a[key]["total_s"], 3)
                for key in ("startup", "restart")
                if key in c and key in a
            }
            for c, a in zip(runs["current"], runs["against"])
        ]
        out["vs_against"]["pairs"] = pairs
        out["vs_against"]["pair_median"] = {
            key: round(statistics.median(p[key] for p in pairs if key in p), 3) for key in ("startup", "restart")
        }
    if args.baseline:
        out["vs_baseline"] = {"baseline": args.baseline, **compare(out, json.loads(Path(args.baseline).read_text()))}
    if args.goodput:
        out["goodput"] = goodput(shards, str(root), args.steps, args.eval_every)
    out["folder"] = str(root) if args.keep else None
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
