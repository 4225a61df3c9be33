"""Every workaround a megaray Train run needs for Ray (2.60), each with the Ray issue or source line it works around.

Code elsewhere imports what it needs from here, so when Ray fixes one of these the change is one
place. Paths of the form ``ray/...:N`` are files of the installed ``ray`` package (2.60.0). A Ray
Tune search's own workarounds are in :mod:`megaray.tune.ray_compat` (imports point from Tune to
Train, never back).

Sections: the one walker of the exceptions Ray wraps around a failure (:func:`error_chain`, with
:func:`root_error` and :func:`user_error` on top); a user's error ends the run
(:class:`UserErrorFailurePolicy`); elastic runs (:class:`GlobalBatchElasticPolicy`); the
``TorchTrainer`` that installs both; no blind placement-group cleaner; Ray Data errors inside
Train workers; branching a run at an older checkpoint (:func:`branch_snapshot`).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Dict, Iterator, List, Optional

from ray.train.torch import TorchTrainer as _TorchTrainer
from ray.train.v2._internal.execution.failure_handling import (
    DefaultFailurePolicy as _DefaultFailurePolicy,
    FailureDecision as _FailureDecision,
)
from ray.train.v2._internal.execution.scaling_policy import (
    ElasticScalingPolicy as _ElasticScalingPolicy,
    NoopDecision as _NoopDecision,
    ResizeDecision as _ResizeDecision,
)

log = logging.getLogger("megaray.ray_compat")

# --- The exceptions Ray wraps around a failure ----------------------------------------------------
#
# What a failed Train run or Tune trial raises is Ray's wrapper around the exception that caused
# it: a Train ``WorkerGroupError`` holds every failed rank's exception (``worker_failures``), a
# ``ControllerError`` its ``controller_failure`` (``ray/train/v2/api/exceptions.py``), a
# ``RayTaskError`` (``ray/exceptions.py``; a task such as a Ray Data reader failed) the exception
# the task raised as ``cause`` (it is also a subclass of that exception's type, with Ray's traceback
# as its message). Below those, Python's own chain: ``__cause__`` (``raise ... from e``), else
# ``__context__`` (raised while handling another) unless suppressed (``from None``).


def _beneath(error: BaseException, context: bool = True) -> List[BaseException]:
    """The exceptions directly beneath ``error``: a ``WorkerGroupError``'s worker failures (lowest
    rank first), else a ``ControllerError``'s ``controller_failure``, a ``RayTaskError``'s
    ``cause``, ``__cause__``, or (with ``context``) ``__context__`` when not suppressed."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return [failures[r] for r in sorted(failures) if isinstance(failures[r], BaseException)]
    implicit = error.__context__ if context and not error.__suppress_context__ else None
    for inner in (getattr(error, "controller_failure", None), getattr(error, "cause", None), error.__cause__, implicit):
        if isinstance(inner, BaseException):
            return [inner]
    return []


def error_chain(error: BaseException, context: bool = True) -> Iterator[BaseException]:
    """``error`` and every exception beneath it through Ray's wrappers and Python's chain (see the
    comment above), depth first: each failed rank's chain in turn, lowest rank first. Each
    exception once (a chain that loops ends). ``context=False``: explicit links only (no
    ``__context__``)."""
    stack, seen = [error], set()
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        stack.extend(reversed(_beneath(exc, context)))


def root_error(error: BaseException) -> BaseException:
    """The exception at the bottom of Ray's wrappers around a failed trial or run: the end of the
    lowest failed rank's chain of :func:`error_chain`, through explicit links only (an exception
    raised while handling another is the failure, not the one it was handling)."""
    root = error
    for root in error_chain(error, context=False):
        if not _beneath(root, context=False):
            break
    return root


# --- A user's error ends the run --------------------------------------------------------------------
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


def user_error(error: BaseException) -> Optional[BaseException]:
    """The :class:`~megaray.errors.MegarayError` behind a Train failure, or None: the first one
    of :func:`error_chain` (every rank's chain, lowest rank first), with Ray Data's retry note cut
    from its message. A ``RayTaskError`` is a subclass of its cause's type with Ray's traceback in
    its message, so it is looked through, not returned."""
    from megaray.errors import MegarayError

    for exc in error_chain(error):
        if isinstance(exc, MegarayError) and not isinstance(getattr(exc, "cause", None), BaseException):
            return _without_ray_data_retry_note(exc)
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
# by megaray's PlacementGroupReaper (:mod:`megaray.tune.ray_compat`), and a driver that dies takes its job's groups along.


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
