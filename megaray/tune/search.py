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

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from megaray.config import ConfigError
from megaray.errors import SearchError
from megaray.tune import ray_compat
from megaray.tune.config import TuneSearch, load_tune_config, trial_run_name
from megaray.tune.report import (
    DIVERGED,
    SearchResult,
    TrialSummary,
    best_trial,
    markdown,
    plot,
    summarize,
    to_csv,
    write_png,
)
from megaray.tune.schedulers import scheduler, search_algorithm
from megaray.tune.space import param_space

log = logging.getLogger("megaray.tune")

PARENT_ROLE = "search"
TRIAL_ROLE = "trial"

__all__ = [
    "run_search",
    "megaray_trial",
    "MetricReportCallback",
    "SearchResult",
    "TrialSummary",
    "param_space",
    "scheduler",
    "search_algorithm",
]


# ----------------------------------------------------------------------------- the trial


class MetricReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that forwards every Train report to Tune, with a NaN/inf search
    metric replaced by a worst-possible finite value (and ``<metric>_nonfinite: 1``), and the ids
    of the Train run's worker placement group and controller
    (:func:`megaray.tune.ray_compat.placement_group_tags`)."""

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
        first.update(ray_compat.placement_group_tags())
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


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
    print(
        f"[megaray.tune] trial {trial_id}: {json.dumps(values, default=str)} -> {cfg.scaling.storage_path}/{cfg.name}",
        flush=True,
    )
    tags = {
        "megaray.tune.role": TRIAL_ROLE,
        "megaray.tune.search": search.name,
        "megaray.tune.trial_id": trial_id,
        "megaray.tune.sampled": json.dumps(values, default=str)[:5000],
    }
    sc = search.config.search
    fit(
        cfg,
        callbacks=[MetricReportCallback(sc.metric, sc.mode), *ray_compat.tracking_callbacks()],
        parent_run_id=parent_run_id,
        mlflow_run_name=f"{search.name}/{trial_id}",
        extra_tags=tags,
        console=False,
    )  # the search's console is Tune's trial table


# ----------------------------------------------------------------------------- the search


def run_search(
    tune_cfg_path: str | os.PathLike | Dict[str, Any],
    overrides: Sequence[str] = (),
    resume: bool = False,
    *,
    base_dir: Optional[str] = None,
) -> SearchResult:
    """Run (or with ``resume=True`` continue) the search described by a tune config.

    Before Ray starts anything: the config is loaded strictly
    (:func:`megaray.tune.config.load_tune_config`), trial 0's config is built and its data
    checked (:meth:`TuneSearch.check_data`), and fresh/resume is checked against storage.
    ``resume=True`` restores with ``Tuner.restore(path, resume_errored=True)``: finished trials
    are kept, unfinished and errored ones continue from their own Train checkpoints.

    Args:
        tune_cfg_path: tune config YAML (or a dict; relative ``base`` then resolves against
            ``base_dir`` or the working directory).
        overrides: ``KEY=VALUE`` strings, see :func:`~megaray.tune.config.load_tune_config`.
        resume: continue the interrupted search of the same name.

    Raises:
        ConfigError: invalid config, or fresh/resume does not match what exists on storage.
        DataError: the data trial 0 reads is not prepared (names the folder and the command).
        SearchError: every trial failed (names each distinct reason).
    """
    from ray import tune

    from megaray.train.launch import ensure_ray

    t0 = time.time()
    search = load_tune_config(tune_cfg_path, overrides, base_dir=base_dir, strict=True)
    search.check_data()
    base = search.require_base()
    exp_path = search.experiment_path()
    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise ConfigError(f"resume: no search state at {exp_path} (start it without --resume)")
    if not resume and exists:
        raise ConfigError(
            f"search {search.name!r} already exists at {exp_path}: pass --resume to continue it, "
            f"or start a new one with --set name=<new name>"
        )
    ensure_ray()
    ray_compat.relax_tune_metric_check()

    uri = base.tracking.resolved_uri() if base.tracking.enabled else None
    parent = _start_parent(search, uri, resume) if uri else None
    trainable = tune.with_resources(
        tune.with_parameters(megaray_trial, search=search, parent_run_id=parent),
        dict(search.config.trial.driver_resources),
    )
    log.info("search %s: %s (parent MLflow run %s)", search.name, exp_path, parent)
    try:
        tuner = (
            tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
            if resume
            else _new_tuner(search, trainable)
        )
        grid = tuner.fit()
    except BaseException as e:
        if parent:
            from megaray.train import mlflow as tracking

            tracking.end_run(uri, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    trials = _collect(search, grid, uri, parent)
    result = SearchResult(
        name=search.name,
        experiment_path=exp_path,
        metric=search.config.search.metric,
        mode=search.config.search.mode,
        trials=trials,
        best=best_trial(trials, search.config.search.mode),
        parent_run_id=parent,
        tracking_uri=uri,
        elapsed_s=time.time() - t0,
    )
    if parent:
        _finish_parent(search, result)
    if trials and all(t.outcome == "error" for t in trials):
        reasons: Dict[str, List[str]] = {}
        for t in trials:
            reasons.setdefault(t.error or "unknown error", []).append(t.trial_id)
        lines = [f"  trial {', '.join(ids)}: {why}" for why, ids in reasons.items()]
        raise SearchError(
            f"search {search.name}: all {len(trials)} trials failed\n"
            + "\n".join(lines)
            + f"\n(trial logs and error.txt under {exp_path})"
        )
    return result


def _new_tuner(search: TuneSearch, trainable):
    from ray import tune

    sc = search.config.search
    return tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=sc.metric,
            mode=sc.mode,
            search_alg=search_algorithm(search),
            scheduler=scheduler(search),
            num_samples=sc.num_samples,
            # random/grid: BasicVariantGenerator carries the limit itself (see search_algorithm)
            max_concurrent_trials=sc.max_concurrent_trials if sc.algorithm == "optuna" else None,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=search.storage(),
            failure_config=tune.FailureConfig(max_failures=search.config.trial.max_failures),
            callbacks=[ray_compat.PlacementGroupReaper()],
        ),
    )


def _trial_name(trial) -> str:
    return trial_run_name(trial.trial_id)


def trial_id_of(path: str) -> str:
    """The Tune trial id of a trial directory ``.../trial_<id>``. A trial restored after its
    directory was made gets ``_<4 hex>`` appended (``ray/tune/experiment/trial.py``,
    ``_create_unique_logdir_name``: a killed driver's last experiment state may predate the
    directory), which is not part of the id the trial's MLflow run is tagged with."""
    name = Path(path).name.removeprefix("trial_")
    m = re.fullmatch(r"(.+_\d{5})_[0-9a-f]{4}", name)
    return m.group(1) if m else name


def _collect(search: TuneSearch, grid, uri: Optional[str], parent: Optional[str]) -> List[TrialSummary]:
    children = _children(uri, search, parent) if parent else {}
    trials: List[TrialSummary] = []
    for r in grid:
        trial_id = trial_id_of(r.path)
        run = children.get(trial_id)
        t = summarize(search, r, trial_id, run.info.run_id if run else None)
        trials.append(t)
        if run is not None:
            _close_child(uri, run, t.outcome)
    return sorted(trials, key=lambda t: t.trial_id)


# ----------------------------------------------------------------------------- MLflow parent and children


def _start_parent(search: TuneSearch, uri: str, resume: bool) -> str:
    from megaray.train import mlflow as tracking

    base = search.require_base()
    exp_path = search.experiment_path()
    run_key = None
    if resume:
        c = tracking.client(uri)
        exp = tracking.experiment_id(uri, base.tracking.experiment)
        found = c.search_runs(
            [exp],
            filter_string=f"tags.`megaray.tune.path` = '{exp_path}' and tags.`megaray.tune.role` = '{PARENT_ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run_key = found[0].data.tags.get(tracking.RUN_KEY_TAG)
            old = found[0].data.tags.get("megaray.tune.spec")
            if old and old != search.spec_hash():
                log.warning(
                    "search %s: base config, overrides or space changed since it started; trials "
                    "not yet started use the current config",
                    search.name,
                )
    run_key = run_key or f"tune:{exp_path}@{time.time():.0f}"
    tags = {
        "megaray.tune.role": PARENT_ROLE,
        "megaray.tune.path": exp_path,
        "megaray.tune.spec": search.spec_hash(),
        "megaray.family": base.model.family,
    }
    parent = tracking.start_run(
        uri, base.tracking.experiment, run_key=run_key, run_name=search.name, params=search.flat_params(), tags=tags
    )
    if not resume:
        rl = tracking.RunLogger(uri, parent)
        rl.text(yaml.safe_dump(search.config.model_dump(mode="json"), sort_keys=False), "tune/search.yaml")
        rl.text(base.to_yaml(), "tune/base_resolved.yaml")
    return parent


def _finish_parent(search: TuneSearch, result: SearchResult) -> None:
    from megaray.train import mlflow as tracking

    uri, parent = result.tracking_uri, result.parent_run_id
    rl = tracking.RunLogger(uri, parent)
    metrics = {f"trials_{k}": float(v) for k, v in result.counts().items()}
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
    rl.text(markdown(result.trials, result.metric, result.best), "tune/trials.md")
    rl.text(to_csv(result.trials, result.metric), "tune/trials.csv")
    png = plot(result)
    if png is not None:
        write_png(png, lambda p: rl.artifact(p, "tune"))
    failed = result.trials and all(t.outcome == "error" for t in result.trials)
    tracking.end_run(uri, parent, "FAILED" if failed else "FINISHED")


def _children(uri: str, search: TuneSearch, parent: str) -> Dict[str, Any]:
    from megaray.train import mlflow as tracking

    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, search.require_base().tracking.experiment)
    runs = c.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}'", max_results=5000)
    return {r.data.tags.get("megaray.tune.trial_id"): r for r in runs}


def _close_child(uri: str, run, outcome: str) -> None:
    """Tag the outcome; a trial stopped by the scheduler had its driver killed, so its run is
    still RUNNING (or FAILED, when fit saw its workers go first): mark it KILLED."""
    from megaray.train import mlflow as tracking

    c = tracking.client(uri)
    c.set_tag(run.info.run_id, "megaray.tune.outcome", outcome)
    if outcome == "stopped_early" and run.info.status != "KILLED":
        c.set_terminated(run.info.run_id, status="KILLED")
    elif run.info.status == "RUNNING":
        c.set_terminated(run.info.run_id, status="FINISHED" if outcome == "completed" else "FAILED")
