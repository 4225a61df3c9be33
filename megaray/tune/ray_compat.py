"""Every workaround a megaray Ray Tune search needs (Ray 2.60), each with the Ray issue or source line it works around.

The search driver (:mod:`megaray.tune.search`) and its schedulers import what they need from here,
so when Ray fixes one of these the change is one place. Paths of the form ``ray/...:N`` are files
of the installed ``ray`` package (2.60.0). The Train run's own workarounds (and the walker of Ray's
exception wrappers, :func:`megaray.train.ray_compat.error_chain`) are in
:mod:`megaray.train.ray_compat`: a trial is a Train run, so this half may use that one, never the
other way round.

Sections: the strict-metric switch and the search algorithm / scheduler subclasses
(:class:`TPESearch`, :class:`ResumableASHA`); the Train worker placement groups of trials a
scheduler stopped (:class:`PlacementGroupReaper`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("megaray.ray_compat")


def relax_tune_metric_check() -> None:
    """Let Tune accept reports that lack the search metric.

    Train reports ``val_*`` only every ``train.eval_every`` steps; Tune's controller raises on the
    first report without the metric unless ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1``
    (``ray/tune/execution/tune_controller.py:1645``). ASHA skips such reports; :class:`TPESearch`
    below skips them for Optuna.
    """
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


class TPESearch(OptunaSearch):
    """Optuna TPE (``OptunaSearch``'s default sampler) that ignores intermediate reports without
    the metric: ``OptunaSearch.on_trial_result`` reads ``result[self.metric]`` unguarded
    (``ray/tune/search/optuna/optuna_search.py:538``) and would raise ``KeyError`` on every Train
    report between evaluations."""

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive ``Tuner.restore``, and which never stops a trial at ``max_t``.

    1. ``Tuner.restore`` rebuilds the scheduler from the pickle written when the experiment
       started, so every rung is empty after a resume (ray-project/ray#30838, open): the first
       trial to reach a rung after a resume always passes it. Here every trial that finished
       before the interruption has its stored results (``result.json``) replayed into the rungs
       when Tune re-adds it.
    2. With ``max_t == grace_period * reduction_factor**k`` ASHA has a rung *at* ``max_t``
       (``ray/tune/schedulers/async_hyperband.py:235``, the rungs of ``_Bracket``), and a trial reaching
       it below the cutoff is stopped although it has nothing left to train; the STOP lands while
       its Train run writes the final checkpoint and closes its MLflow run, which then ends
       FAILED. The result is still recorded in the rung; the trial ends by itself.
    """

    def on_trial_result(self, tune_controller, trial, result: Dict) -> str:
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
    import json

    st = trial.storage
    with st.storage_filesystem.open_input_stream(f"{st.trial_fs_path}/result.json") as f:
        text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- Train worker placement groups of trials a scheduler stopped -------------------------------
#
# When ASHA stops a trial, Tune ends the trial's driver actor and its Train controller dies with
# it without shutting its worker group down (ray-project/ray#54305). Ray keeps a placement group
# created by an actor until the *job* ends, and Train V2's fix, ``PlacementGroupCleaner``
# (ray-project/ray#58515), asks the dashboard's state API whether the controller is alive
# (``ray/train/v2/_internal/execution/controller/placement_group_cleaner.py:80``,
# ``is_actor_alive``), which a local ``ray.init(include_dashboard=False)`` cluster does not have:
# it retries (hundreds of log lines) and never removes the group. Every early-stopped trial would
# hold its workers' CPUs until the search ends, and a long ASHA search on a laptop starves.
# The pieces: WorkerGroupTracker (in the Train controller) records the group's id;
# placement_group_tags() adds it to every report Tune sees; PlacementGroupReaper (in the search
# driver) removes it once the controller is dead, read from the GCS actor table (no dashboard).

PG_KEY = "train_placement_group"
CONTROLLER_KEY = "train_controller"
# Set in the Train controller's process by WorkerGroupTracker, read by placement_group_tags().
_WORKER_PG: Dict[str, str] = {}

try:  # internal Train V2 hook (ray/train/v2/_internal/execution/callback.py:64)
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
except ImportError:  # pragma: no cover - other Ray versions
    _WorkerGroupCallback = None


if _WorkerGroupCallback is not None:

    class WorkerGroupTracker(_WorkerGroupCallback):
        """Train callback (runs in the Train controller): remembers the worker group's placement group."""

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                _WORKER_PG["id"] = pg.id.hex()
            except Exception:  # noqa: BLE001 - best effort
                log.debug("could not read the worker group's placement group", exc_info=True)
else:  # pragma: no cover
    WorkerGroupTracker = None


def tracking_callbacks() -> List[Any]:
    """Train callbacks a Tune trial adds to its ``TorchTrainer`` so the reaper can find its workers."""
    return [WorkerGroupTracker()] if WorkerGroupTracker is not None else []


def placement_group_tags() -> Dict[str, str]:
    """``{PG_KEY: <hex id>, CONTROLLER_KEY: <actor id>}`` to add to a report (empty before the
    worker group started); called from a ``TuneReportCallback`` in the Train controller."""
    if not _WORKER_PG.get("id"):
        return {}
    import ray

    try:
        controller = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001
        controller = None
    return {PG_KEY: _WORKER_PG["id"], **({CONTROLLER_KEY: controller} if controller else {})}


class PlacementGroupReaper(Callback):
    """Tune callback (search driver): removes the Train worker placement group of a trial that
    ended, once its Train controller is dead (see the comment above).

    Removal waits for the controller's death (GCS actor table), so a controller still alive
    cannot mistake the removal for a worker failure and start a new worker group. Trials that
    end normally have removed theirs already.
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
    """From the GCS actor table (``ray._private.state.actors``), which needs no dashboard."""
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
