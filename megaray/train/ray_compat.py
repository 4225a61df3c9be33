"""Every workaround megaray needs for Ray (2.60), each with the Ray issue or source line it works around.

Code elsewhere imports what it needs from here, so when Ray fixes one of these the change is one
place. Paths of the form ``ray/...:N`` are files of the installed ``ray`` package (2.60.0).

Sections: **Tune** (search driver and trial side of a Ray Tune search over Ray Train V2 runs),
**Train** (the training loop and its launch).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Dict, List, Optional

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("megaray.ray_compat")

# ============================================================================= Tune


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


def root_error(error: BaseException) -> BaseException:
    """The exception at the bottom of Ray's wrappers around a failed trial or run.

    Follows a ``RayTaskError``'s ``cause`` (``ray/exceptions.py``, the exception the task
    raised), a Train ``WorkerGroupError``'s first ``worker_failures`` entry, a
    ``ControllerError``'s ``controller_failure`` (``ray/train/v2/api/exceptions.py``), then
    ``__cause__``.
    """
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = (
            (failures[min(failures)] if failures else None)
            or getattr(error, "controller_failure", None)
            or getattr(error, "cause", None)
            or error.__cause__
        )
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


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


# ============================================================================= Train
#
# A MegarayError (bad data, bad config, corrupt checkpoint) raised inside a Train worker is the
# user's doing: retrying cannot fix it. Train V2 offers no public way to say so:
# ``DataParallelTrainer.fit`` always builds ``create_failure_policy(failure_config)``
# (``ray/train/v2/api/data_parallel_trainer.py:183``, ray-project/ray#51067), whose
# ``DefaultFailurePolicy`` retries every ``WorkerGroupError`` up to ``max_failures`` times
# (``ray/train/v2/_internal/execution/failure_handling/default.py``, ``_is_retryable_error``).
# UserErrorFailurePolicy raises at once when any worker's exception (``worker_failures``: the
# exception object the worker raised, ``ray/train/v2/_internal/execution/worker_group/poll.py``,
# ``WorkerGroupPollStatus.errors``) is a MegarayError, and defers to the default policy for
# everything else (killed workers, lost nodes, bugs). TorchTrainer hands it to the controller
# by overriding the private ``_initialize_and_run_controller(**controller_init_kwargs)``
# (``data_parallel_trainer.py:267``).

from ray.train.torch import TorchTrainer as _TorchTrainer  # noqa: E402
from ray.train.v2._internal.execution.failure_handling import (  # noqa: E402
    DefaultFailurePolicy as _DefaultFailurePolicy,
    FailureDecision as _FailureDecision,
)
from ray.train.v2._internal.execution.scaling_policy import (  # noqa: E402
    ElasticScalingPolicy as _ElasticScalingPolicy,
    NoopDecision as _NoopDecision,
    ResizeDecision as _ResizeDecision,
)


def user_error(error: BaseException) -> Optional[BaseException]:
    """The :class:`~megaray.errors.MegarayError` behind a Train failure, or None.

    Looks through ``WorkerGroupError.worker_failures`` (lowest rank first) and each exception's
    cause chain (``__cause__`` / ``__context__``, and ``RayTaskError.cause`` for errors raised
    inside Ray tasks such as Ray Data readers)."""
    from megaray.errors import MegarayError

    failures = getattr(error, "worker_failures", None)
    candidates = [failures[r] for r in sorted(failures)] if failures else [error]
    for exc in candidates:
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            inner = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
            if isinstance(inner, BaseException):
                exc = inner  # (RayTaskError subclasses its cause's type; the cause has the plain message)
                continue
            if isinstance(exc, MegarayError):
                return _without_ray_data_retry_note(exc)
            exc = exc.__cause__ or exc.__context__
    return None


#: Ray Data appends this (and how to configure its retries) to the message of an exception that
#: exhausted its task retries (``ray/data/_internal/util.py:1590``, ``_annotate_exception_with_retry_context``)
_RAY_DATA_RETRY_NOTE = re.compile(r"\nFailed to .* after \d+/\d+ attempts \(total backoff .*", re.S)


def _without_ray_data_retry_note(exc: BaseException) -> BaseException:
    """``exc`` with Ray Data's retry note cut from its message (a user's error says what to do
    about the data, not how to tune Ray's retries)."""
    msg = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
    if msg is None or not _RAY_DATA_RETRY_NOTE.search(msg):
        return exc
    return type(exc)(_RAY_DATA_RETRY_NOTE.sub("", msg))


class UserErrorFailurePolicy(_DefaultFailurePolicy):
    """Train V2 failure policy: RAISE on a user's error (MegarayError) in any worker, else default."""

    def make_decision(self, training_failed_error):
        if user_error(training_failed_error) is not None:
            log.info(
                "a worker raised %s: ending the run without retrying", type(user_error(training_failed_error)).__name__
            )
            return _FailureDecision.RAISE
        return super().make_decision(training_failed_error)


# --- Elastic runs: any size that divides the global batch; growth at a checkpoint -----------------
#
# A megaray checkpoint resumes at any world size (the global cursor, :mod:`megaray.data.order`;
# ZeRO state through DeepSpeed's universal checkpoint, :mod:`megaray.train.universal`), as long
# as the size divides the run's global batch into whole micro-batches. Ray's ElasticScalingPolicy
# (``ray/train/v2/_internal/execution/scaling_policy/elastic.py``) restarts a failed group with
# whatever fits (``make_decision_for_non_running_worker_group``) and a running group with more
# workers whenever more fit (``make_decision_for_running_worker_group``): the first may pick a
# size that cannot divide the global batch, and the second throws away every step since the last
# checkpoint. GlobalBatchElasticPolicy rounds both down to an allowed size, and defers growth of a
# running group until the run's next checkpoint is in storage, then restarts from it.


class GlobalBatchElasticPolicy(_ElasticScalingPolicy):
    """Ray Train V2's elastic scaling policy restricted to ``worlds`` (the sizes that divide the
    global batch), growing a running group only right after a checkpoint.

    A failed or new group starts with the largest allowed size that fits (at least ``min``), not
    the size of the checkpoint it resumes. When more workers fit while the group runs, the policy
    waits for the next checkpoint (polled in storage every :attr:`POLL_S` seconds) and restarts
    the group at the larger size from it.

    Args:
        scaling_config: Ray Train's ``ScalingConfig`` with ``num_workers=(min, max)``.
        run_dir: ``<storage_path>/<run name>`` (local path or URI), where the checkpoints are.
        worlds: the allowed world sizes (ascending).
    """

    POLL_S = 1.0

    def __init__(self, scaling_config: Any, run_dir: str, worlds: List[int]):
        super().__init__(scaling_config)
        self.run_dir, self.worlds = run_dir, sorted(worlds)
        self._grow_to: Optional[int] = None  # a larger size waiting for the next checkpoint
        self._grow_after: Optional[int] = None  # the checkpoint step when growth was decided
        self._polled = 0.0

    def allowed(self, n: int) -> Optional[int]:
        """The largest allowed world size <= ``n`` (None when none is)."""
        fits = [w for w in self.worlds if w <= n]
        return fits[-1] if fits else None

    def _checkpoint_step(self) -> int:
        from megaray.train.checkpoint import resume_state

        state = resume_state(self.run_dir)
        return -1 if state is None else int(state.step)

    def make_decision_for_non_running_worker_group(self):
        self._grow_to = None
        decision = super().make_decision_for_non_running_worker_group()
        if not isinstance(decision, _ResizeDecision):
            return decision
        n = self.allowed(decision.num_workers)
        if n is None:
            log.info(
                "%d workers fit; none of the allowed sizes %s (they divide the global batch)",
                decision.num_workers,
                self.worlds,
            )
            return _NoopDecision()
        return _ResizeDecision(num_workers=n, resources_per_worker=decision.resources_per_worker)

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        if self._grow_to is not None:  # waiting for the next checkpoint
            now = time.monotonic()
            if now - self._polled < self.POLL_S:
                return _NoopDecision()
            self._polled = now
            if self._checkpoint_step() > self._grow_after:
                n, self._grow_to = self._grow_to, None
                log.info(
                    "growing the worker group from %d to %d workers at its new checkpoint",
                    worker_group_state.num_workers,
                    n,
                )
                return _ResizeDecision(
                    num_workers=n, resources_per_worker=self.scaling_config._resources_per_worker_not_none
                )
            return _NoopDecision()
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if not isinstance(decision, _ResizeDecision):
            return decision
        n = self.allowed(decision.num_workers)
        if n is None or n <= worker_group_state.num_workers:
            return _NoopDecision()
        self._grow_to, self._grow_after, self._polled = n, self._checkpoint_step(), time.monotonic()
        log.info(
            "%d workers fit (the group has %d): growing at the run's next checkpoint", n, worker_group_state.num_workers
        )
        return _NoopDecision()


class TorchTrainer(_TorchTrainer):
    """``ray.train.torch.TorchTrainer`` whose controller uses :class:`UserErrorFailurePolicy`,
    an elastic run's :class:`GlobalBatchElasticPolicy` (``run_dir``: where the run's checkpoints
    are; ``worlds``: the sizes that divide its global batch), and no Ray ``PlacementGroupCleaner`` on a cluster that has no dashboard
    (see :func:`without_blind_cleaner`)."""

    def __init__(self, *args: Any, run_dir: Optional[str] = None, worlds: Optional[List[int]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._megaray_run_dir, self._megaray_worlds = run_dir, worlds

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorFailurePolicy(self.run_config.failure_config)
        if self.scaling_config.elasticity_enabled and self._megaray_run_dir:
            worlds = self._megaray_worlds or list(
                range(self.scaling_config.min_workers, self.scaling_config.max_workers + 1)
            )
            controller_init_kwargs["scaling_policy"] = GlobalBatchElasticPolicy(
                self.scaling_config, self._megaray_run_dir, worlds
            )
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _create_default_callbacks(self):
        return without_blind_cleaner(super()._create_default_callbacks())


# --- 12 s at the end of every run on a cluster without a dashboard --------------------------------
#
# Train V2's PlacementGroupCleanerCallback (``ray/train/v2/_internal/callbacks/
# placement_group_callback.py``) starts a detached actor whose thread asks the dashboard's state
# API every second whether the controller is alive (``is_actor_alive``, 10 s timeout). A local
# ``ray.init(include_dashboard=False)`` cluster (megaray's default) has no state API: each query
# hangs 10 s and logs "Failed to query Ray Train Controller actor state", and at the end of the
# run ``_stop_cleaner`` waits ``2 * 1 + 10`` s for that thread and logs "Failed to stop
# PlacementGroupCleaner gracefully". Measured: 12 of the 43 s of a 4-step debug run. Without a
# dashboard the cleaner can never act, so it is left out; Tune trials' groups are still removed
# by megaray's PlacementGroupReaper (above), and a driver that dies takes its job's groups along.


def _dashboard_running() -> bool:
    try:
        from ray._private.services import get_webui_url_from_internal_kv

        return bool(get_webui_url_from_internal_kv())
    except Exception:  # noqa: BLE001 - cannot tell: keep Ray's default
        return True


def without_blind_cleaner(callbacks: List[Any]) -> List[Any]:
    """``callbacks`` without Ray Train's ``PlacementGroupCleanerCallback`` when the cluster has
    no dashboard (the cleaner's only way to see the controller); unchanged otherwise."""
    if _dashboard_running():
        return callbacks
    return [cb for cb in callbacks if type(cb).__name__ != "PlacementGroupCleanerCallback"]


# --- Ray Data errors inside Train workers ---------------------------------------------------------


def keep_user_errors_in_ray_data() -> None:
    """Make Ray Data raise a map function's own exception (a DataError naming a corrupt shard)
    instead of ``UserCodeException("UDF failed to process a data block.") from e``
    (``ray/data/_internal/planner/plan_udf_map_op.py:479``, ``_try_wrap_udf_exception``): the
    ``from e`` link does not survive pickling to the Train worker, so the DataError's type and
    message would be lost. Sets the driver's DataContext, which datasets created after it carry."""
    from ray.data import DataContext

    DataContext.get_current().raise_original_map_exception = True


# --- Branching a run at an older checkpoint (megaray train --resume-from) -------------------------
#
# Ray Train V2 restores a run from ``<storage_path>/<name>/checkpoint_manager_snapshot.json``
# (``ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py``, ``_load_state``): the
# checkpoints it reported (``checkpoint_results`` with their report indices), the one handed to the
# workers as ``ray.train.get_checkpoint()`` (``latest_checkpoint_result``, ``before_init_train_context``)
# and the ones awaiting validation. On load every listed checkpoint must still exist
# (``_assert_checkpoints_exist``: a missing one is a ``CheckpointManagerInitializationError``, "corrupted
# run directory"). Train V2 has no API to pick another checkpoint of a run, so when megaray moves
# the checkpoints past a branch point aside (:mod:`megaray.train.branch`) it rewrites the snapshot:
# the moved ones are dropped from every list and the branch point becomes the latest. The file's
# schema is Ray's ``_CheckpointManagerState`` (pydantic; ``ray_version`` must stay as written).

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def branch_snapshot(run_dir: str, latest: str, dropped: List[str], metrics: Optional[Dict[str, Any]] = None) -> bool:
    """Rewrite Ray Train's checkpoint-manager snapshot of ``run_dir`` so that checkpoint folder
    ``latest`` (a name such as ``step_00000004``) is the run's latest and the folders in ``dropped``
    are forgotten. ``latest`` missing from the snapshot (a checkpoint persisted but not yet
    registered when its run died) is added after the others, with ``metrics``.

    Returns False when the run folder has no snapshot (Ray Train has not registered a checkpoint of
    it: nothing to rewrite), True once rewritten. Local or ``s3://``/``gs://`` (one atomic write).
    """
    import json

    from megaray import fs

    path = fs.join(run_dir, RAY_SNAPSHOT)
    if not fs.exists(path):
        return False
    state = json.loads(fs.read_text(path))
    gone = set(dropped)
    results, indices = [], []
    for result, index in zip(state.get("checkpoint_results", []), state.get("checkpoint_report_indices", [])):
        if result["checkpoint_dir_name"] not in gone:
            results.append(result)
            indices.append(index)
    chosen = next((r for r in results if r["checkpoint_dir_name"] == latest), None)
    if chosen is None:
        chosen = {"version": 0, "checkpoint_dir_name": latest, "metrics": dict(metrics or {})}
        results.append(chosen)
        indices.append(int(state.get("current_report_index", 0)))
        state["current_report_index"] = indices[-1] + 1
    pending = [
        (r, spec)
        for r, spec in zip(state.get("pending_training_results", []), state.get("pending_validation_specs", []))
        if r["checkpoint_dir_name"] not in gone
    ]
    state.update(
        checkpoint_results=results,
        checkpoint_report_indices=indices,
        latest_checkpoint_result=chosen,
        pending_training_results=[r for r, _ in pending],
        pending_validation_specs=[s for _, s in pending],
    )
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        state[key] = [name for name in state.get(key, []) if name not in gone]
    fs.write_text(path, json.dumps(state))
    return True
