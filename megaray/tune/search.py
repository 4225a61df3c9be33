"""Run a hyperparameter search: Ray Tune over Ray Train V2 runs, one MLflow parent per search.

Shape (Ray Train V2; there is no ``Tuner(trainer)``)::

    run_search(config)                       the search driver (this process)
      Tuner(megaray_trial, param_space)      one Tune trial per sampled point; the trial's driver
        megaray_trial(config)                function needs its own CPU (trial.driver_resources)
          fit(cfg, callbacks=[report cb])    builds and fits a TorchTrainer (trial.num_workers)
            train_loop_per_worker            every ray.train.report reaches the scheduler

Storage: ``<storage>/<search name>/`` is the Tune experiment (trial dirs, experiment state);
trial ``<id>``'s Ray Train run (checkpoints) is ``<storage>/<search name>/runs/trial_<id>``. The
trial id survives :meth:`ray.tune.Tuner.restore`, so a trial restarted by ``resume=True``
continues its own checkpoints and its own MLflow child run (found again by run key).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from megaray.config import ConfigError
from megaray.tune.config import TuneSearch, load_tune_config, trial_run_name

log = logging.getLogger("megaray.tune")

# Stand-in for a NaN/inf search metric: Tune's schedulers compare numbers, and a diverged trial
# must rank last (ASHA treats NaN as "no information" and would let it run on).
DIVERGED = 1e30
PARENT_ROLE = "search"
TRIAL_ROLE = "trial"


# ----------------------------------------------------------------------------- results


@dataclass
class TrialSummary:
    """One trial after the search.

    Attributes:
        trial_id: Tune trial id (stable across resume).
        params: the sampled values, by space key.
        outcome: ``completed`` (reached train.max_steps), ``stopped_early`` (by the scheduler),
            ``error`` or ``not_run``.
        last_step: last reported ``step``.
        metric: last reported value of the search metric (None if never reported).
        best_metric: best value reported over the trial.
        curve: ``[(step, metric)]`` of every report carrying the metric.
        val_curve: ``[(step, val_loss)]`` when the metric is not val_loss (for the plot).
        checkpoint: latest Train checkpoint of the trial.
        run_dir: the trial's Ray Train run directory.
        mlflow_run_id: the trial's nested MLflow run.
        error: first line of the error, for failed trials.
    """

    trial_id: str
    params: Dict[str, Any]
    outcome: str
    last_step: Optional[int]
    metric: Optional[float]
    best_metric: Optional[float]
    curve: List[tuple] = field(default_factory=list)
    val_curve: List[tuple] = field(default_factory=list)
    checkpoint: Optional[str] = None
    run_dir: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None


@dataclass
class SearchResult:
    """What :func:`run_search` leaves behind.

    Attributes:
        name: search name.
        experiment_path: Tune experiment directory (pass to ``resume``).
        metric / mode: what was optimised.
        trials: every trial, in trial-id order.
        best: the trial with the best final metric (None if no trial reported it).
        parent_run_id / tracking_uri: the MLflow parent run (None when tracking is off).
        elapsed_s: wall time of this call.
    """

    name: str
    experiment_path: str
    metric: str
    mode: str
    trials: List[TrialSummary]
    best: Optional[TrialSummary]
    parent_run_id: Optional[str]
    tracking_uri: Optional[str]
    elapsed_s: float

    def table(self) -> str:
        """Markdown table of every trial (also logged to the parent run as ``tune/trials.md``)."""
        return _markdown(self.trials, self.metric, self.best)

    def summary(self) -> str:
        """What a CLI prints at the end: counts, the best trial, where to look, the table."""
        n = {o: sum(t.outcome == o for t in self.trials) for o in ("completed", "stopped_early", "error")}
        lines = [f"search {self.name}: {len(self.trials)} trials ({n['completed']} completed, "
                 f"{n['stopped_early']} stopped early, {n['error']} failed) in {self.elapsed_s:.0f} s",
                 f"  experiment  {self.experiment_path}"]
        if self.best is not None:
            lines += [f"  best        trial {self.best.trial_id}: {self.metric} {_fmt(self.best.metric)} "
                      f"at step {self.best.last_step}",
                      f"  params      {json.dumps(self.best.params, default=str)}",
                      f"  checkpoint  {self.best.checkpoint}"]
        if self.parent_run_id:
            from megaray.train.mlflow import run_url

            lines.append(f"  mlflow      {run_url(self.tracking_uri, self.parent_run_id)}")
            lines.append(f"  children    mlflow.search_runs(filter_string=\"tags.mlflow.parentRunId = "
                         f"'{self.parent_run_id}'\")")
        return "\n".join(lines) + "\n\n" + self.table()


# ----------------------------------------------------------------------------- the trial


class TPESearch(OptunaSearch):
    """Optuna TPE (``OptunaSearch``'s default sampler) that skips intermediate reports without the
    metric (Train reports val_* only every eval_every steps)."""

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)



class MetricReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that forwards every Train report to Tune, with a NaN/inf search
    metric replaced by a worst-possible finite value (and ``<metric>_nonfinite: 1``), and the id
    of the Train run's worker placement group (``train_placement_group``, see
    :class:`PlacementGroupReaper`)."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric = metric
        self.worst = DIVERGED if mode == "min" else -DIVERGED

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        v = first.get(self.metric)
        if v is not None and not math.isfinite(float(v)):
            first[self.metric] = self.worst
            first[f"{self.metric}_nonfinite"] = 1.0
        if _WORKER_PG.get("id"):
            first[PG_KEY] = _WORKER_PG["id"]
            first[CONTROLLER_KEY] = _controller_id()
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def _controller_id() -> Optional[str]:
    import ray

    try:
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001
        return None


# The Train controller of a trial runs in its own actor process: the id of its current worker
# placement group is kept here (set by _WorkerGroupTracker, read by MetricReportCallback).
_WORKER_PG: Dict[str, str] = {}
PG_KEY = "train_placement_group"
CONTROLLER_KEY = "train_controller"

try:  # internal Train V2 hook ("custom workarounds built on top of internal callbacks")
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
except ImportError:  # pragma: no cover - other Ray versions
    _WorkerGroupCallback = None


if _WorkerGroupCallback is not None:

    class _WorkerGroupTracker(_WorkerGroupCallback):
        """Runs in the Train controller: remembers the worker group's placement group."""

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                _WORKER_PG["id"] = pg.id.hex()
            except Exception:  # noqa: BLE001 - best effort
                log.debug("could not read the worker group's placement group", exc_info=True)


def _train_callbacks(metric: str, mode: str) -> List[Any]:
    cbs: List[Any] = [MetricReportCallback(metric, mode)]
    if _WorkerGroupCallback is not None:
        cbs.append(_WorkerGroupTracker())
    return cbs


class PlacementGroupReaper(Callback):
    """Tune callback (search driver): removes the Train worker placement group of a trial that
    ended, once its Train controller is dead.

    When a scheduler stops a trial, Tune ends the trial's driver actor and its Train controller
    dies with it, without shutting its worker group down. Ray keeps a placement group created by
    an actor until the *job* ends, and Train V2's ``PlacementGroupCleaner`` needs the Ray
    dashboard's state API (absent on a local ``ray.init(include_dashboard=False)`` cluster), so
    every early-stopped trial would hold its workers' resources until the search ends; a long
    ASHA search on a laptop then starves. The placement group is removed only after the
    controller is dead (GCS actor table), so a controller still alive cannot mistake the removal
    for a worker failure and start a new worker group. Trials that end normally have removed
    theirs already.
    """

    GIVE_UP_S = 120.0  # remove anyway when the controller's state cannot be read for this long

    def __init__(self) -> None:
        self._live: Dict[str, Dict[str, set]] = {}
        self._ended: Dict[str, tuple] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(PG_KEY):
            entry = self._live.setdefault(trial.trial_id, {"pgs": set(), "controllers": set()})
            entry["pgs"].add(result[PG_KEY])
            if result.get(CONTROLLER_KEY):
                entry["controllers"].add(result[CONTROLLER_KEY])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial.trial_id)

    def on_step_begin(self, iteration, trials, **info) -> None:
        self._reap(wait_s=0.0)

    def on_experiment_end(self, trials, **info) -> None:
        self._reap(wait_s=30.0)

    def _end(self, trial_id: str) -> None:
        entry = self._live.pop(trial_id, None)
        if entry:
            self._ended[trial_id] = (entry["pgs"], entry["controllers"], time.monotonic())

    def _reap(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while self._ended:
            for trial_id, (pgs, controllers, ended_at) in list(self._ended.items()):
                if all(_actor_dead(a) for a in controllers) or time.monotonic() - ended_at > self.GIVE_UP_S:
                    del self._ended[trial_id]
                    for hex_id in pgs:
                        _remove_placement_group(trial_id, hex_id)
            if not self._ended or time.monotonic() >= deadline:
                return
            time.sleep(0.5)


def _actor_dead(actor_id: str) -> bool:
    try:
        from ray._private.state import actors

        return actors(actor_id=actor_id).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - unknown: keep waiting (GIVE_UP_S bounds it)
        return False


def _remove_placement_group(trial_id: str, hex_id: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    try:
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
        if placement_group_table(pg).get("state") in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED"):
            remove_placement_group(pg)
            log.info("trial %s: removed its Train placement group %s", trial_id, hex_id)
    except Exception:  # noqa: BLE001 - best effort
        log.debug("could not remove placement group %s", hex_id, exc_info=True)


def megaray_trial(config: Dict[str, Any], search: TuneSearch = None, parent_run_id: Optional[str] = None) -> None:
    """Tune trial driver: build the trial's RunConfig and fit a TorchTrainer (Train V2 pattern)."""
    from ray import tune

    from megaray.train.launch import fit

    if os.environ.get("MEGARAY_DATA_PROGRESS", "0") != "1":  # ensure_ray() does this only in a fresh driver
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    cfg = search.trial_config(config, trial_id)
    values = search.decode(config)
    print(f"[megaray.tune] trial {trial_id}: {json.dumps(values, default=str)} -> {cfg.scaling.storage_path}/{cfg.name}",
          flush=True)
    tags = {"megaray.tune.role": TRIAL_ROLE, "megaray.tune.search": search.name, "megaray.tune.trial_id": trial_id,
            "megaray.tune.sampled": json.dumps(values, default=str)[:5000]}
    sc = search.config.search
    fit(cfg, callbacks=_train_callbacks(sc.metric, sc.mode), parent_run_id=parent_run_id,
        mlflow_run_name=f"{search.name}/{trial_id}", extra_tags=tags)


# ----------------------------------------------------------------------------- the search


def run_search(tune_cfg_path: str | os.PathLike | Dict[str, Any], overrides: Sequence[str] = (),
               resume: bool = False, *, base_dir: Optional[str] = None) -> SearchResult:
    """Run (or with ``resume=True`` continue) the search described by a tune config.

    Everything about the config is checked before Ray starts a trial (see
    :func:`megaray.tune.config.load_tune_config`, always strict here). A fresh search refuses to
    start where one of the same name already left state; ``resume=True`` restores it with
    ``Tuner.restore(path, resume_errored=True)``: finished trials are kept, unfinished and errored
    ones continue from their own Train checkpoints.

    Args:
        tune_cfg_path: tune config YAML (or a dict; relative ``base`` then resolves against
            ``base_dir`` or the working directory).
        overrides: ``KEY=VALUE`` strings, see :func:`~megaray.tune.config.load_tune_config`.
        resume: continue the interrupted search of the same name.

    Raises:
        ConfigError: invalid config, or fresh/resume does not match what exists on storage.
    """
    from ray import tune

    from megaray.train.launch import ensure_ray

    t0 = time.time()
    search = load_tune_config(tune_cfg_path, overrides, base_dir=base_dir, strict=True)
    base = search.require_base()
    exp_path = search.experiment_path()
    ensure_ray()
    # Train reports val_* only every eval_every steps: Tune must accept reports without the metric
    # (ASHA skips them; the searchers below only see reports that carry it).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise ConfigError(f"resume: no search state at {exp_path} (start it without --resume)")
    if not resume and exists:
        raise ConfigError(
            f"search {search.name!r} already exists at {exp_path}: pass --resume to continue it, "
            f"or start a new one with --set name=<new name>"
        )

    uri = base.tracking.resolved_uri() if base.tracking.enabled else None
    parent = _start_parent(search, uri, resume) if uri else None
    trainable = tune.with_resources(
        tune.with_parameters(megaray_trial, search=search, parent_run_id=parent),
        dict(search.config.trial.driver_resources),
    )
    log.info("search %s: %s (parent MLflow run %s)", search.name, exp_path, parent)
    try:
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(search),
                tune_config=tune.TuneConfig(
                    metric=search.config.search.metric,
                    mode=search.config.search.mode,
                    search_alg=search_algorithm(search),
                    scheduler=scheduler(search),
                    num_samples=search.config.search.num_samples,
                    # random/grid: BasicVariantGenerator carries the limit itself (see search_algorithm)
                    max_concurrent_trials=(search.config.search.max_concurrent_trials
                                           if search.config.search.algorithm == "optuna" else None),
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=search.name,
                    storage_path=search.storage(),
                    failure_config=tune.FailureConfig(max_failures=search.config.trial.max_failures),
                    callbacks=[PlacementGroupReaper()],
                ),
            )
        grid = tuner.fit()
    except BaseException as e:
        if parent:
            from megaray.train import mlflow as tracking

            tracking.end_run(uri, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    trials = _collect(search, grid, uri, parent)
    best = _best(trials, search.config.search.mode)
    result = SearchResult(
        name=search.name, experiment_path=exp_path, metric=search.config.search.metric,
        mode=search.config.search.mode, trials=trials, best=best, parent_run_id=parent, tracking_uri=uri,
        elapsed_s=time.time() - t0,
    )
    if parent:
        _finish_parent(search, result)
    return result


def _trial_name(trial) -> str:
    return trial_run_name(trial.trial_id)


def param_space(search: TuneSearch) -> Dict[str, Any]:
    """The Tune ``param_space``: one Tune domain per space key."""
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # YAML: both ends included
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    return {key: make[kind](args) for key, (kind, args) in search.tune_space().items()}


def search_algorithm(search: TuneSearch):
    """The Tune search algorithm for ``search.algorithm`` (random, optuna, grid)."""
    s = search.config.search
    if s.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search.algorithm 'optuna' needs the optuna package: pip install optuna") from None
        return TPESearch(seed=s.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A SearchAlgorithm ignores TuneConfig.max_concurrent_trials: give it the limit itself.
    return BasicVariantGenerator(max_concurrent=s.max_concurrent_trials or 0, random_state=s.seed)


def scheduler(search: TuneSearch):
    """The Tune trial scheduler for ``scheduler.type`` (fifo, asha; pbt is rejected at load)."""
    from ray.tune.schedulers import FIFOScheduler

    s = search.config.scheduler
    if s.type == "asha":
        max_t = s.max_t or search.max_steps()
        # stop_last_trials=False: a trial that survives the rungs runs to train.max_steps and ends
        # by itself (its Train run finishes and closes its MLflow run).
        return ResumableASHA(time_attr=s.time_attr, max_t=max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=False)
    return FIFOScheduler()


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive ``Tuner.restore``.

    Tune saves the search algorithm with the experiment state but not the scheduler: a restored
    search starts with empty rungs, so the first trial to reach a rung after a resume always
    passes it. Here every trial that finished before the interruption has its reported results
    (the trial's ``result.json`` in storage) replayed into the rungs when Tune re-adds it.
    """

    def on_trial_result(self, tune_controller, trial, result: Dict) -> str:
        """As ASHA, except that a report at ``max_t`` never stops the trial.

        With ``max_t == grace_period * reduction_factor**k`` ASHA has a rung *at* ``max_t``, and a
        trial that reaches it below the cutoff is stopped, though it has nothing left to train.
        The STOP lands while its Train run is writing the final checkpoint and closing its
        MLflow run, which then ends ``FAILED`` with no final checkpoint recorded. The result is
        still recorded in the rung (later cutoffs see it); the trial ends by itself.
        """
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, -1) >= self._max_t:
            self._num_stopped -= 1
            return self.CONTINUE
        return action

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status not in ("TERMINATED", "ERROR"):
            return
        bracket = self._trial_info.get(trial.trial_id)
        try:
            results = _stored_results(trial)
        except Exception:  # noqa: BLE001 - no results: nothing to replay
            log.debug("no stored results for trial %s", trial.trial_id, exc_info=True)
            return
        for r in results:
            if bracket is not None and self._time_attr in r and self._metric in r:
                bracket.on_result(trial, r[self._time_attr], self._metric_op * r[self._metric])


def _stored_results(trial) -> List[Dict[str, Any]]:
    st = trial.storage
    with st.storage_filesystem.open_input_stream(f"{st.trial_fs_path}/result.json") as f:
        text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- MLflow parent


def _start_parent(search: TuneSearch, uri: str, resume: bool) -> str:
    from megaray.train import mlflow as tracking

    base = search.require_base()
    exp_path = search.experiment_path()
    run_key = None
    if resume:
        c = tracking.client(uri)
        exp = tracking.experiment_id(uri, base.tracking.experiment)
        found = c.search_runs([exp], filter_string=f"tags.`megaray.tune.path` = '{exp_path}' and "
                                                    f"tags.`megaray.tune.role` = '{PARENT_ROLE}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_key = found[0].data.tags.get(tracking.RUN_KEY_TAG)
            old = found[0].data.tags.get("megaray.tune.spec")
            if old and old != search.spec_hash():
                log.warning("search %s: base config, overrides or space changed since it started; trials "
                            "not yet started use the current config", search.name)
    if run_key is None:
        run_key = f"tune:{exp_path}@{time.time():.0f}"
    tags = {"megaray.tune.role": PARENT_ROLE, "megaray.tune.path": exp_path, "megaray.tune.spec": search.spec_hash(),
            "megaray.family": base.model.family}
    parent = tracking.start_run(uri, base.tracking.experiment, run_key=run_key, run_name=search.name,
                                params=search.flat_params(), tags=tags)
    rl = tracking.RunLogger(uri, parent)
    if not resume:
        rl.text(yaml_dump(search.config.model_dump(mode="json")), "tune/search.yaml")
        rl.text(base.to_yaml(), "tune/base_resolved.yaml")
    return parent


def _finish_parent(search: TuneSearch, result: SearchResult) -> None:
    from megaray.train import mlflow as tracking

    uri, parent = result.tracking_uri, result.parent_run_id
    rl = tracking.RunLogger(uri, parent)
    counts = {o: sum(t.outcome == o for t in result.trials) for o in ("completed", "stopped_early", "error")}
    metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
    metrics["trials"] = float(len(result.trials))
    if result.best is not None and result.best.metric is not None:
        metrics[f"best_{result.metric}"] = result.best.metric
    rl.metrics(metrics, step=0)
    if result.best is not None:
        b = result.best
        rl.tag("megaray.tune.best_trial", b.trial_id)
        if b.mlflow_run_id:
            rl.tag("megaray.tune.best_run_id", b.mlflow_run_id)
        if b.checkpoint:
            rl.tag("megaray.tune.best_checkpoint", b.checkpoint)
        for k, v in b.params.items():
            rl.tag(f"best.{k}", json.dumps(v, default=str) if not isinstance(v, str) else v)
    rl.text(result.table(), "tune/trials.md")
    rl.text(_csv(result.trials, result.metric), "tune/trials.csv")
    png = _plot(result)
    if png is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "curves.png"
            p.write_bytes(png)
            rl.artifact(p, "tune")
    tracking.end_run(uri, parent, "FINISHED")


# ----------------------------------------------------------------------------- collecting results


def _collect(search: TuneSearch, grid, uri: Optional[str], parent: Optional[str]) -> List[TrialSummary]:
    metric = search.config.search.metric
    children = _children(uri, search, parent) if parent else {}
    better = min if search.config.search.mode == "min" else max
    trials: List[TrialSummary] = []
    for r in grid:
        trial_id = Path(r.path).name.removeprefix("trial_")
        df = r.metrics_dataframe
        last_step = ckpt = None
        curve: List[tuple] = []
        val_curve: List[tuple] = []
        if df is not None and len(df) and "step" in df:
            steps = df["step"].dropna()
            last_step = int(steps.iloc[-1]) if len(steps) else None
            curve = _series(df, metric)
            if metric != "val_loss":
                val_curve = _series(df, "val_loss")
            if "checkpoint_path" in df:
                c = df["checkpoint_path"].dropna()
                ckpt = str(c.iloc[-1]) if len(c) else None
        try:
            max_steps = search.trial_config(r.config or {}, trial_id).train.max_steps  # may be searched
        except ConfigError:
            max_steps = search.max_steps()
        values = [v for _, v in curve]
        if r.error is not None:
            outcome = "error"
        elif last_step is None:
            outcome = "not_run"
        elif last_step >= max_steps:
            outcome = "completed"
        else:
            outcome = "stopped_early"
        run = children.get(trial_id)
        trials.append(TrialSummary(
            trial_id=trial_id, params=search.decode(r.config or {}), outcome=outcome, last_step=last_step,
            metric=values[-1] if values else None, best_metric=better(values) if values else None, curve=curve,
            val_curve=val_curve, checkpoint=ckpt, run_dir=f"{search.runs_path()}/{trial_run_name(trial_id)}",
            mlflow_run_id=run.info.run_id if run else None,
            error=str(r.error).strip().splitlines()[0][:300] if r.error is not None and str(r.error).strip() else None,
        ))
        if run is not None:
            _close_child(uri, run, outcome)
    trials.sort(key=lambda t: t.trial_id)
    return trials


def _series(df, column: str) -> List[tuple]:
    if column not in df:
        return []
    sub = df[["step", column]].dropna()
    return [(int(s), float(v)) for s, v in zip(sub["step"], sub[column])]


def _children(uri: str, search: TuneSearch, parent: str) -> Dict[str, Any]:
    from megaray.train import mlflow as tracking

    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, search.require_base().tracking.experiment)
    runs = c.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}'", max_results=5000)
    return {r.data.tags.get("megaray.tune.trial_id"): r for r in runs}


def _close_child(uri: str, run, outcome: str) -> None:
    """Tag the outcome; a trial stopped by the scheduler had its driver killed, so its run is
    still RUNNING: mark it KILLED."""
    from megaray.train import mlflow as tracking

    c = tracking.client(uri)
    c.set_tag(run.info.run_id, "megaray.tune.outcome", outcome)
    if outcome == "stopped_early" and run.info.status != "KILLED":
        # its driver was killed mid-fit (RUNNING), or fit saw its workers go first (FAILED)
        c.set_terminated(run.info.run_id, status="KILLED")
    elif run.info.status == "RUNNING":
        c.set_terminated(run.info.run_id, status="FINISHED" if outcome == "completed" else "FAILED")


def _best(trials: List[TrialSummary], mode: str) -> Optional[TrialSummary]:
    scored = [t for t in trials if t.metric is not None and t.outcome != "error" and abs(t.metric) < DIVERGED]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


# ----------------------------------------------------------------------------- reports


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "diverged" if abs(v) >= DIVERGED else f"{v:.4g}"
    if isinstance(v, dict):  # a multi-key choice: n_layer=4,n_embd=64
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "" if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))


def _markdown(trials: List[TrialSummary], metric: str, best: Optional[TrialSummary]) -> str:
    keys = sorted({k for t in trials for k in t.params})
    head = ["trial", "outcome", "last step", f"{metric} (last)", f"{metric} (best)", *keys, "mlflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        mark = " **best**" if best is not None and t.trial_id == best.trial_id else ""
        row = [t.trial_id + mark, t.outcome, _fmt(t.last_step), _fmt(t.metric), _fmt(t.best_metric),
               *[_fmt(t.params.get(k)) for k in keys], t.mlflow_run_id or ""]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def _csv(trials: List[TrialSummary], metric: str) -> str:
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "outcome", "last_step", f"{metric}_last", f"{metric}_best", *keys, "mlflow_run_id",
                "checkpoint", "error"])
    for t in trials:
        w.writerow([t.trial_id, t.outcome, t.last_step, t.metric, t.best_metric,
                    *[_fmt(t.params.get(k)) for k in keys], t.mlflow_run_id, t.checkpoint, t.error])
    return buf.getvalue()


def _plot(result: SearchResult) -> Optional[bytes]:
    """PNG of every trial's curve of the search metric (and of val_loss when the metric is another
    one), step on x; trials stopped early dashed, the best one bold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(result.metric, "curve")]
    if result.metric != "val_loss" and any(t.val_curve for t in result.trials):
        panels.append(("val_loss", "val_curve"))
    if not any(getattr(t, attr) for _, attr in panels for t in result.trials):
        return None
    n = len(result.trials)
    fig = Figure(figsize=(9 * len(panels), 5 + 0.17 * n), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, attr) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        curves = [(t, [(s, v) for s, v in getattr(t, attr) if abs(v) < DIVERGED]) for t in result.trials]
        vals = [v for _, c in curves for _, v in c]
        for t, c in curves:
            if not c:
                continue
            label = f"{t.trial_id} " + " ".join(
                _fmt(v) if isinstance(v, dict) else f"{k.split('.')[-1]}={_fmt(v)}" for k, v in t.params.items())
            is_best = result.best is not None and t.trial_id == result.best.trial_id
            ax.plot([s for s, _ in c], [v for _, v in c], marker="o", markersize=3,
                    linestyle="--" if t.outcome == "stopped_early" else "-", linewidth=2.5 if is_best else 1.2,
                    label=label[:110] + (" (best)" if is_best else "") + (" (stopped)" if t.outcome == "stopped_early" else ""))
        if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{result.name}: {name} per trial")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def yaml_dump(d: Dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
