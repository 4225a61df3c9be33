"""Optional loop parts: built only when the driver asks for them, absent from a normal run.

The loop's own parts (reporter, evaluator, checkpointer) run in every run and decide for
themselves when they are due. An :class:`Extra` is a part a run has only when its
:class:`~megaray.train.spec.WorkerSpec` asks: a profile run (``spec.profile``: the
:class:`~megaray.train.profiler.Profiler`) or the test hooks (``spec.debug``: :class:`Trace`,
:class:`FaultAtStep`, :class:`StepSleep`, :class:`Poison`, :class:`Hang`). :func:`megaray.train.loop.build_extras` makes the
worker's list; for a normal run it is empty, so the loop constructs nothing and calls nothing for
them. The training guard (:class:`megaray.train.guard.Guard`, ``train.guard``, on by default)
and, with more than one worker, the straggler monitor
(:class:`megaray.train.stragglers.StragglerMonitor`, ``train.stragglers``) use the same hooks and
are added by the worker itself.

The hooks, in the order the loop calls them (all no-ops by default; a part overrides its own):

=============================  ================================================================
``start(state, modules)``      once, after the checkpoint is restored, before the first batch
``served(ids)``                each micro-batch: its served sample positions (positioned stream)
``before_batch(b, state, e)``  each micro-batch, collated, before ``task.train_step``
``after_batch(metrics)``       each micro-batch, after ``task.train_step``
``evaluated(step, reads)``     after each evaluation
``after_step(step)``           after each optimizer step, once the due parts ran (reports
                               published, checkpoint saved)
``close()``                    when the loop ends
=============================  ================================================================

A part with ``pauses_eval_and_checkpoints`` (the profiler) turns evaluation and checkpoints off on
every rank: its run is a diagnostic, and the last step's evaluation and checkpoint would otherwise
land inside the profiled window.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import torch

from megaray.train import startup
from megaray.train.checkpoint import TrainState

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from megaray.train.spec import DebugHooks


class Extra:
    """An optional part of the loop (see the module's table of hooks)."""

    #: a run with this part neither evaluates nor checkpoints (on every rank)
    pauses_eval_and_checkpoints: bool = False

    def start(self, state: TrainState, modules: Mapping[str, torch.nn.Module]) -> None:
        """After restore, before the first micro-batch."""

    def served(self, ids: List[int]) -> None:
        """The served sample positions of the next micro-batch (:func:`megaray.train.loop.positioned_batches`)."""

    def before_batch(
        self, batch: Mapping[str, torch.Tensor], state: TrainState, engines: Mapping[str, "DeepSpeedEngine"]
    ) -> None:
        """A collated micro-batch, before the task trains on it (``state``: before the step;
        ``engines``: the loop's DeepSpeed engines)."""

    def after_batch(self, metrics: Mapping[str, float]) -> None:
        """The task's metrics of the micro-batch just trained on."""

    def evaluated(self, step: int, reads: int) -> None:
        """After the evaluation at ``step``; ``reads``: executions of the validation split so far."""

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` and the parts that were due at it."""

    def close(self) -> None:
        """The loop ended."""


def debug_parts(hooks: "DebugHooks", rank: int) -> List[Extra]:
    """The parts of the test hooks that are set (:class:`~megaray.train.spec.DebugHooks`)."""
    parts: List[Extra] = []
    if hooks.trace:
        parts.append(Trace(hooks.trace, rank))
    if hooks.fault_at_step is not None and rank == 0:
        parts.append(FaultAtStep(hooks.fault_at_step, hooks.trace))
    if hooks.step_sleep_s:
        parts.append(StepSleep(hooks.step_sleep_s))
    if hooks.poison:
        parts.append(Poison(dict(hooks.poison)))
    if hooks.slow_rank is not None and hooks.slow_rank[0] == rank:
        parts.append(StepSleep(hooks.slow_rank[1]))
    if hooks.hang_at is not None and hooks.hang_at[0] == rank:
        parts.append(Hang(hooks.hang_at[1]))
    return parts


class Trace(Extra):
    """``MEGARAY_TRACE=path``: what each rank trained, as JSON lines (tests and benchmarks read them).

    * ``path.rank<r>``: one line per micro-batch once it has been trained on: ``step`` (the
      optimizer step it belongs to), ``epoch``, ``cursor`` (the global cursor before it), ``fp``
      (a fingerprint of the batch's first tensor), ``lr``, ``pid``, ``replayed`` (batches read
      again to reach the resume position: always 0, the stream starts at its cursor), ``ids``
      (its served sample positions), ``world``, ``t`` (wall clock before the step),
      ``t_end`` (after it), ``loss``;
    * ``path.starts.rank<r>``: one line per worker start: ``pid``, ``step`` (where it starts),
      ``weights_l1`` (the L1 norm of each module's weights after restore), ``marks`` (the
      worker's start-up phases so far, :mod:`megaray.train.startup`);
    * ``path.evals.rank<r>``: one line per evaluation: ``step``, ``val_reads`` (executions of the
      validation split so far), ``pid``.
    """

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank
        self.file = open(f"{path}.rank{rank}", "a")
        self.pending: Optional[Dict[str, Any]] = None
        self.replayed = 0
        self.ids: Optional[List[int]] = None

    def start(self, state: TrainState, modules: Mapping[str, torch.nn.Module]) -> None:
        weights = {
            name: float(sum(p.detach().double().abs().sum() for p in m.parameters())) for name, m in modules.items()
        }
        with open(f"{self.path}.starts.rank{self.rank}", "a") as f:
            f.write(
                json.dumps({"pid": os.getpid(), "step": state.step, "weights_l1": weights, "marks": startup.marks()})
                + "\n"
            )

    def served(self, ids: List[int]) -> None:
        self.ids = ids

    def before_batch(
        self, batch: Mapping[str, torch.Tensor], state: TrainState, engines: Mapping[str, "DeepSpeedEngine"]
    ) -> None:
        first = next(iter(batch.values()))
        self.pending = {
            "step": state.step + 1,
            "epoch": state.epoch,
            "cursor": state.samples_in_epoch,
            "fp": hashlib.sha1(first.detach().cpu().numpy().tobytes()).hexdigest()[:16],
            "lr": float(engines["model"].get_lr()[0]),
            "pid": os.getpid(),
            "replayed": self.replayed,
            "ids": self.ids,
            "world": state.world_size,
            "t": time.time(),
        }

    def after_batch(self, metrics: Mapping[str, float]) -> None:
        if self.pending is not None:
            self.file.write(json.dumps({**self.pending, "t_end": time.time(), "loss": metrics.get("loss")}) + "\n")
            self.file.flush()
            self.pending = None

    def evaluated(self, step: int, reads: int) -> None:
        with open(f"{self.path}.evals.rank{self.rank}", "a") as f:
            f.write(json.dumps({"step": step, "val_reads": reads, "pid": os.getpid()}) + "\n")

    def close(self) -> None:
        self.file.close()


class FaultAtStep(Extra):
    """``MEGARAY_FAULT_AT_STEP=N`` (rank 0 only): raise right after step N's reports and
    checkpoint: a crash, for resume tests (Ray Train restarts the group; ``max_failures=0`` ends
    the run with this error). With the trace on (``trace``: its path), the time of the crash goes
    to ``<trace>.fault`` first (``step``, ``t``, ``pid``: the restart benchmark's zero)."""

    def __init__(self, step: int, trace: Optional[str] = None):
        self.step, self.trace = step, trace

    def after_step(self, step: int) -> None:
        if step == self.step:
            if self.trace:
                startup.write_line(f"{self.trace}.fault", {"step": step, "t": time.time(), "pid": os.getpid()})
            raise RuntimeError(f"MEGARAY_FAULT_AT_STEP: injected failure after step {step}")


class StepSleep(Extra):
    """``MEGARAY_STEP_SLEEP_S=s``: sleep ``s`` seconds after each optimizer step (a slow run, so
    the elastic tests can change the cluster while it trains); ``MEGARAY_SLOW_RANK=r:s``: on rank
    ``r`` only (a straggler)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_step(self, step: int) -> None:
        time.sleep(self.seconds)


class Hang(Extra):
    """``MEGARAY_HANG_AT_STEP=RANK:STEP`` (that rank only): block forever at the first micro-batch
    of optimizer step STEP (step STEP - 1 done: its reports and checkpoint too), in a worker that
    started the run from step 0 only (the group Ray Train restarts from a checkpoint trains on).
    The other ranks block in step STEP's collective; the watchdog (:mod:`megaray.train.watchdog`)
    ends it."""

    def __init__(self, step: int):
        self.step = step
        self.armed = False

    def start(self, state: TrainState, modules: Mapping[str, torch.nn.Module]) -> None:
        self.armed = state.step == 0

    def before_batch(
        self, batch: Mapping[str, torch.Tensor], state: TrainState, engines: Mapping[str, "DeepSpeedEngine"]
    ) -> None:
        if self.armed and state.step + 1 == self.step:
            hang_here_forever()


def hang_here_forever() -> None:
    """Block the calling thread for good, in a C wait no exception reaches (as a stuck collective)."""
    import threading

    threading.Event().wait()


class Poison(Extra):
    """``MEGARAY_POISON_STEPS="6:nan,9:spike"``: the first micro-batch of the first attempt at
    each listed step (every rank) trains on its loss times the factor (NaN; 1000 for ``spike``):
    the ``"model"`` engine's ``backward`` is wrapped for that micro-batch, and its ``loss``
    metric is scaled alike. Fires once per step per worker process, so the replay after the
    guard's rollback (:mod:`megaray.train.guard`) trains clean."""

    def __init__(self, factors: Mapping[int, float]):
        self.factors = dict(factors)
        self.engine: Any = None
        self.factor: Optional[float] = None

    def before_batch(
        self, batch: Mapping[str, torch.Tensor], state: TrainState, engines: Mapping[str, "DeepSpeedEngine"]
    ) -> None:
        factor = self.factors.pop(state.step + 1, None)
        if factor is None:
            return
        engine, backward = engines["model"], engines["model"].backward
        self.engine, self.factor = engine, factor
        engine.backward = lambda loss, *a, **kw: backward(loss * factor, *a, **kw)

    def after_batch(self, metrics: Mapping[str, float]) -> None:
        if self.engine is not None:
            del self.engine.backward  # the instance attribute: DeepSpeed's own method again
            if "loss" in metrics and isinstance(metrics, dict):
                metrics["loss"] = metrics["loss"] * self.factor
            self.engine, self.factor = None, None
