"""The one training loop: ``train_loop_per_worker`` run by every Ray Train worker.

Per worker: read the driver's :class:`~megaray.train.spec.WorkerSpec`, rebuild the config, find
the checkpoint this worker group resumes from (its ``megaray.json`` only), take the run's global
batch and derive the accumulation for this world size, let rank 0 build the task's positioned
train stream at the checkpoint's cursor and split it over the ranks (:func:`_positioned_shard`;
reading starts while DeepSpeed builds), build the task's modules, wrap each in a DeepSpeed engine
and restore the checkpoint (through DeepSpeed's universal form at another world size). The parts
decide for themselves when they are due: the :class:`~megaray.train.reporter.Reporter`
(progress, MLflow, paced Ray reports), the :class:`~megaray.train.evaluator.Evaluator` and the
:class:`~megaray.train.checkpoint.Checkpointer`; the task owns the step clock and the
``after_step`` hook; the :class:`~megaray.train.ema.EMA` follows every optimizer step. The
:class:`~megaray.train.guard.Guard` (``train.guard``, on by default) judges each optimizer step
before any part sees it and undoes a bad one (:meth:`_Worker.rollback`). Optional
parts (:mod:`megaray.train.extras`) are built only when the spec asks for them: a profile run
(``spec.profile``: the :class:`~megaray.train.profiler.Profiler`, which turns evaluation and
checkpoints off on every rank) and the test hooks (``spec.debug``: trace, injected crash, slow
steps); a normal run has none of those, only the guard (which is an :class:`Extra` too) and, with
more than one worker, the :class:`~megaray.train.stragglers.StragglerMonitor` (``train.stragglers``).

Every rank consumes the same number of micro-batches per epoch, so collectives never hang on an
uneven last batch, and the ``world x batch_size x accum`` samples of an optimizer step are the
same global batch at any world size (:mod:`megaray.data.order`).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Container, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from megaray.config import RunConfig
from megaray.tasks.base import Task
from megaray.train.checkpoint import Checkpointer, TrainState, init_weights
from megaray.train.extras import Extra, debug_parts
from megaray.train.spec import WorkerSpec
from megaray.train.startup import mark


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"spec": WorkerSpec}``
    (:meth:`~megaray.train.spec.WorkerSpec.loop_config`, from :func:`megaray.train.launch.fit`)."""
    mark("loop")  # start-up phases (megaray.train.startup)
    import ray.train

    w = _Worker(WorkerSpec.of(config))
    cfg, task, engines, state, extras = w.cfg, w.task, w.engines, w.state, w.extras
    t = cfg.train
    start_step = state.step
    batches = positioned_batches(w.head, cfg.data.batch_size, state, w.rank, w.world, extras, w.skips)
    for part in extras:  # the optional parts (a normal run: the guard alone)
        part.start(state, w.modules)
    while state.step < t.max_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        if w.stragglers is not None:
            w.stragglers.data_wait(t1 - t0)
        batch = task.collate(batch, w.device)
        for part in extras:
            part.before_batch(batch, state, engines)
        metrics = task.train_step(engines, batch, state.step)
        for part in extras:
            part.after_batch(metrics)
        units = task.batch_units(batch) * w.world
        state.samples_in_epoch += cfg.data.batch_size * w.world
        state.tokens += units
        t2 = time.perf_counter()
        w.reporter.meter.add(metrics, data_s=t1 - t0, total_s=t2 - t0, units=units)
        w.reporter.time.micro_batch(data_s=t1 - t0, compute_s=t2 - t1)
        step = task.global_step(engines)
        if step == state.step:  # inside a gradient-accumulation window
            continue
        if w.guard is not None:  # train.guard: a bad step is undone before any part sees it
            verdict = w.guard.check(step, engines)
            if verdict.bad and w.rollback(verdict):  # back to the last checkpoint, in place; its stream restarts
                batches = positioned_batches(w.head, cfg.data.batch_size, state, w.rank, w.world, extras, w.skips)
                w.arm("step", state.step + 1)
                continue
        state.step = step
        w.end_of_step(step)
        w.arm("step", step + 1)  # the watchdog: the next optimizer step's timeout starts now
    if w.watchdog is not None:
        w.watchdog.stop()
    if state.step == start_step and state.metrics:
        # Nothing left to train (a re-run of a finished run, or a Tune trial restarted after it
        # finished but before Tune saved that): hand Ray Train the final report again, so the
        # result and Tune's view of the trial end at max_steps. MLflow already has it.
        w.reporter.say(
            f"run already at step {state.step} of {t.max_steps}: nothing to train; re-reporting its final metrics"
        )
        ray.train.report(dict(state.metrics))
    skipped = w.reporter.pacer.skipped
    paced = f" ({skipped} progress report(s) kept from Ray Train by pacing; all are in MLflow)" if skipped else ""
    w.reporter.say(f"done: step {state.step}, {state.tokens:,} {task.unit}{paced}")
    w.reporter.say(w.reporter.time.summary())
    for part in extras:
        part.close()
    w.reporter.close()


class _Worker:
    """One worker's run: config, task, engines, EMA and the parts, set up in that order; then the
    optional parts the spec asks for (``extras``: empty in a normal run)."""

    def __init__(self, spec: WorkerSpec):
        import socket

        import ray.train
        import ray.train.torch

        from megaray import families
        from megaray.train.device import peak_flops
        from megaray.train.engines import build_engines, resolve_precision
        from megaray.train.evaluator import Evaluator
        from megaray.train.mlflow import RunLogger, node_name
        from megaray.train.reporter import Reporter
        from megaray.train.trackers import open_trackers

        self.cfg = cfg = spec.run_config()
        mark("config")
        ctx = ray.train.get_context()
        self.rank, self.world = rank, world = ctx.get_world_rank(), ctx.get_world_size()
        # train.watchdog: every phase from here on has a timeout (the start-up phase first)
        self.watchdog: Optional[Any] = None
        if cfg.train.watchdog.enabled:
            from megaray.train.watchdog import Watchdog, console_teller

            self.watchdog = Watchdog(cfg.train.watchdog, rank, spec.run_dir, tell=console_teller(spec.console)).start()
        # where this group resumes (read before anything is built: the stream starts at its cursor)
        self.checkpointer = Checkpointer(cfg, spec.run_dir, rank, world)
        source, saved = self._locate()
        mark("locate")
        # the global batch is the run's, at any world size; the accumulation follows from it
        info = spec.info.for_world(world, saved.global_batch if saved is not None and saved.global_batch else None)
        if info.plan is not None:
            cfg.train.grad_accum_steps = info.plan.accum(world)  # ConfigError when world cannot divide it
        self.task: Task = families.task_class(cfg.model.family, cfg.train.task)(cfg, info=info)
        task = self.task
        mark("task")
        # a positioned stream: rank 0 builds it at the restored cursor and splits it over the ranks;
        # reading starts now, while the engines build (fast start)
        self.head = self._stream(saved)
        mark("stream")
        _seed_everything(cfg.train.seed + rank)
        self.device = device = ray.train.torch.get_device()
        precision = resolve_precision(cfg.train.precision, device)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

        self.modules = modules = task.build_modules()
        if cfg.train.init_from:  # fine-tuning: start from another run's weights
            init_weights(modules["model"], cfg.train.init_from)
        mark("modules")
        self.engines = build_engines(task, modules, cfg, precision, device)
        mark("engines")
        frozen = {name: m.to(device).eval().requires_grad_(False) for name, m in task.frozen_modules().items()}
        self.ema = _ema(cfg, modules["model"])
        self.checkpointer.extra_files = task.checkpoint_files() if rank == 0 else {}
        self.state, where = self.checkpointer.restore(self.engines, source, self.ema)
        mark("restore")
        self.state.world_size = world
        if info.plan is not None:
            self.state.global_batch = info.plan.global_batch

        logger = RunLogger(spec.tracking_uri, spec.mlflow_run_id) if rank == 0 else RunLogger(None, None)
        node = node_name(socket.gethostname(), ray.get_runtime_context().get_node_id())
        if ctx.get_local_rank() == 0:  # system metrics of every node, keyed by node: system/<node>/...
            node_logger = logger if rank == 0 else RunLogger(spec.tracking_uri, spec.mlflow_run_id)
            node_logger.start_system_metrics(cfg.tracking.system_metrics_interval_s, node_id=node)
        if logger.enabled and cfg.tracking.log_checkpoints:  # rank 0: every checkpoint an MLflow LoggedModel
            from megaray.train.logged_models import CheckpointModels

            self.checkpointer.on_saved = CheckpointModels(logger, cfg.name, cfg.model.family, cfg.model.preset)
        if self.watchdog is not None and logger.enabled:  # stacks an earlier group's watchdog dumped
            from megaray.train.watchdog import log_dumps

            log_dumps(logger, spec.run_dir)
        trackers = open_trackers(spec.trackers, logger, rank, cfg.flat(), self.state.step)
        self.reporter = Reporter(
            cfg.train,
            logger,
            rank,
            world,
            task.unit,
            task.flops_per_unit(modules),
            cfg.train.peak_flops or peak_flops(device),
            self.state.step,
            spec.t0,
            spec.console,
            trackers,
        )
        self.evaluator = Evaluator(task, cfg, lambda: ray.train.get_dataset_shard("val"), world, frozen, self.ema)
        self.extras: Tuple[Extra, ...] = build_extras(spec, rank, device, self.reporter.say, logger)
        # a profile run evaluates and checkpoints on no rank (the same on every rank)
        self.paused = any(part.pauses_eval_and_checkpoints for part in self.extras)
        # train.guard (a profile run has no checkpoints to roll back to); MEGARAY_SKIP_SAMPLES seeds its skips
        seeded = spec.debug.skip_samples if spec.debug is not None else ()
        self.guard: Optional[Any] = None
        if cfg.train.guard.enabled and not self.paused:
            from megaray.train.guard import Guard

            self.guard = Guard(cfg.train.guard, rank, world, device, self.reporter.say, logger, seeded)
            self.extras += (self.guard,)
        self.skips = self.guard.skips if self.guard is not None else set(seeded)
        # train.stragglers: per-rank timing and the slow-rank warning (world > 1; collective per step)
        self.stragglers: Optional[Any] = None
        if cfg.train.stragglers.enabled and world > 1:
            from megaray.train.stragglers import StragglerMonitor

            self.stragglers = StragglerMonitor.joined(
                cfg.train.stragglers, rank, world, self.reporter.due, self.reporter.say, logger, node
            )
            self.extras += (self.stragglers,)
        s = self.state
        if where is not None:
            resized = (
                f", written by {saved.world_size} workers" if saved is not None and saved.world_size != world else ""
            )
            converted = (
                f"; ZeRO state converted to universal in {self.checkpointer.conversion_s:.1f}s"
                if self.checkpointer.conversion_s
                else ""
            )
            self.reporter.say(
                f"resumed from {where} at step {s.step} (epoch {s.epoch}, sample {s.samples_in_epoch}"
                f"{resized}{converted})"
            )
            self.reporter.time.add("resize", self.checkpointer.conversion_s)
        n_params = sum(p.numel() for p in modules["model"].parameters())
        t = cfg.train
        ema = f", EMA {t.ema_decay}" if self.ema is not None else ""
        self.reporter.say(
            f"{cfg.model.family} {cfg.model.preset or ''}: {n_params / 1e6:.2f}M params, world {world}, "
            f"ZeRO stage {t.zero_stage}, precision {precision}, micro-batch {cfg.data.batch_size} "
            f"x accum {t.grad_accum_steps} x {world} = global batch "
            f"{cfg.data.batch_size * t.grad_accum_steps * world}{ema}"
        )
        mark("ready")

    def _locate(self) -> Tuple[Optional[Any], Optional[TrainState]]:
        """The checkpoint to restore and its state (:meth:`Checkpointer.locate`), rank 0's on every rank."""
        source, saved = self.checkpointer.locate()
        if self.world > 1:  # every rank restores what rank 0 found (a checkpoint can land between two listings)
            box = [(source, saved)]
            torch.distributed.broadcast_object_list(box, src=0)
            source, saved = box[0]
        return source, saved

    def _stream(self, saved: Optional[TrainState]) -> "Prefetch":
        """This rank's micro-batches of the train stream from ``saved``'s cursor, the first one fetching."""
        return Prefetch(
            _positioned_shard(self.task, saved, self.rank, self.world).iter_torch_batches(
                batch_size=self.cfg.data.batch_size, drop_last=True, prefetch_batches=2
            )
        )

    def rollback(self, verdict: Any) -> bool:
        """Undo the bad step of ``verdict`` (:mod:`megaray.train.guard`): restore the last checkpoint
        in process (weights, optimizer state, LR schedule and counters of every engine, EMA, RNG;
        ``self.state`` updated in place) and restart the train stream at its cursor (``self.head``);
        the guard's skips leave the bad steps' samples out from then on. Collective. Returns
        False for a spike before the run's first checkpoint: nothing to roll back to, the step stands.

        Raises:
            GuardTripped: a non-finite step before the run's first checkpoint.
        """
        from megaray.train.guard import GuardTripped

        t0 = time.perf_counter()
        source, saved = self._locate()
        assert self.guard is not None
        if source is None and verdict.reason == "spike":
            self.guard.kept(verdict)
            return False
        if source is None:
            raise GuardTripped(
                f"train.guard: step {verdict.step} is bad ({verdict.detail}) before the run's first checkpoint: "
                f"nothing to roll back to; lower train.checkpoint_every (now {self.cfg.train.checkpoint_every}) "
                "or train.lr, or set train.guard.enabled=false to train through it"
            )
        self.arm("checkpoint", verdict.step)  # the watchdog: a restore is a checkpoint phase
        restored, where = self.checkpointer.restore(self.engines, source, self.ema)
        vars(self.state).update(vars(restored))
        self.state.world_size = self.world
        self.head = self._stream(saved)
        self.reporter.meter.reset()
        self.reporter.time.add("rollback", time.perf_counter() - t0)  # restore and stream restart (not the replay)
        if self.stragglers is not None:
            self.stragglers.exclude(time.perf_counter() - t0)
        self.guard.rolled_back(verdict, restored.step, where)
        return True

    def end_of_step(self, step: int) -> None:
        """After optimizer step ``step``: the task's hook, the EMA, then whichever parts are due."""
        self.task.after_step(self.engines, step)
        if self.ema is not None:
            self.ema.update(self.engines["model"].module)
        t_parts = time.perf_counter()
        report: Dict[str, float] = {}
        if self.reporter.due(step):
            report.update(self.reporter.progress(self.engines, step))
        clock = self.reporter.time
        if not self.paused and self.evaluator.due(step):
            self.arm("eval", step)
            t0 = time.perf_counter()
            report.update(self.evaluator.run(self.engines, step, self.reporter))
            clock.add("eval", time.perf_counter() - t0)
            for part in self.extras:
                part.evaluated(step, self.evaluator.reads)
        save = not self.paused and self.checkpointer.due(step)
        if report or save:
            checkpoint = self._save if save else None
            self.reporter.publish(report, step, self.state, checkpoint)
        if self.stragglers is not None:  # reports, evaluation, checkpoint: bookkeeping, not a rank's pace
            self.stragglers.exclude(time.perf_counter() - t_parts)
        for part in self.extras:  # the optional parts (a normal run: the guard alone)
            part.after_step(step)

    def arm(self, phase: str, step: int) -> None:
        """Tell the watchdog (``train.watchdog``) the loop enters ``phase`` at ``step``."""
        if self.watchdog is not None:
            self.watchdog.arm(phase, step)

    def _save(self, report: Dict[str, Any]) -> None:
        self.arm("checkpoint", self.state.step)
        t0 = time.perf_counter()
        self.checkpointer.save_and_report(report, self.engines, self.state, self.ema)
        self.reporter.time.add("checkpoint", time.perf_counter() - t0)


def _ema(cfg: RunConfig, model: torch.nn.Module) -> Optional[Any]:
    if cfg.train.ema_decay is None:
        return None
    from megaray.train.ema import EMA

    return EMA(model, cfg.train.ema_decay)


def build_extras(
    spec: WorkerSpec, rank: int, device: torch.device, say: Callable[[str], None], logger: Any
) -> Tuple[Extra, ...]:
    """The optional loop parts ``spec`` asks for, on this rank (:mod:`megaray.train.extras`): the
    profiler (``spec.profile``) first, then the test hooks (``spec.debug``). Empty for a normal run."""
    parts: List[Extra] = []
    if spec.profile:
        from megaray.train.profiler import Profiler

        parts.append(Profiler(int(spec.profile), spec.run_dir, device, say, logger, record=rank == 0))
    if spec.debug is not None:
        parts.extend(debug_parts(spec.debug, rank))
    return tuple(parts)


class Prefetch:
    """An iterator whose first item is fetched by a background thread from construction on
    (the first Ray Data execution overlaps DeepSpeed's set-up); errors surface on ``next``."""

    def __init__(self, iterable: Any):
        import threading

        self._it = iter(iterable)
        self._first: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._fetch, name="megaray-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it, _END)
            mark("first_batch")
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not _END:
            yield self._first
            self._first = None
            yield from self._it


_END = object()


def _positioned_shard(task: Task, saved: Optional[TrainState], rank: int, world: int) -> Any:
    """This rank's share of the task's positioned train stream (:meth:`megaray.tasks.base.Task.train_stream`),
    from the cursor of the checkpoint the group restores (``saved``; the start for a new run).

    Rank 0 builds the stream and ``streaming_split(world, equal=True)``s it (blocks of one
    micro-batch, dealt round robin, in order), then broadcasts the split iterators to the other
    ranks (``torch.distributed.broadcast_object_list``). Built in the worker, not by the driver or
    Ray Train's controller, because only here is the restored checkpoint known: the cursor and
    the checkpoint are always the same one, on local and remote storage alike. Collective."""
    import torch.distributed as dist

    splits = None
    if rank == 0:
        from megaray.train.ray_compat import keep_user_errors_in_ray_data

        keep_user_errors_in_ray_data()
        epoch, cursor = (saved.epoch, saved.samples_in_epoch) if saved is not None else (0, 0)
        ds = task.train_stream(epoch, cursor, task.info.plan)
        ds.context.execution_options.preserve_order = True  # round robin in served order
        splits = ds.streaming_split(world, equal=True)
    if world == 1:
        return splits[0]
    box = [splits]
    dist.broadcast_object_list(box, src=0)
    return box[0][rank]


def positioned_batches(
    batches: Any,
    batch_size: int,
    state: TrainState,
    rank: int,
    world: int,
    extras: Sequence[Extra] = (),
    skip: Container[Tuple[int, int]] = (),
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Micro-batches of a positioned stream (:meth:`megaray.tasks.base.Task.train_stream`) from
    where ``state`` stands, checked against the stream's ``epoch``/``index`` columns (removed).

    The next micro-batch of rank ``r`` must start at served position ``state.samples_in_epoch +
    r * batch_size`` (the global cursor; :mod:`megaray.data.order`); a stream at another position
    raises RuntimeError. The served positions go to the optional parts' ``served`` (the trace:
    :class:`megaray.train.extras.Trace`). A micro-batch whose ``(epoch, first position)`` is in
    ``skip`` (the guard's bad steps, :attr:`megaray.train.guard.Guard.skips`) is passed over: the
    cursor moves on by ``world * batch_size`` and nothing is yielded. The caller advances
    ``state.samples_in_epoch`` by ``world * batch_size`` after training on a batch."""
    for batch in batches:
        epoch, index = int(batch.pop("epoch")[0]), batch.pop("index")
        first = int(index[0])
        if epoch > state.epoch:  # the stream moved on to the next epoch
            state.epoch, state.samples_in_epoch = epoch, 0
        want = state.samples_in_epoch + rank * batch_size
        if (epoch, first) != (state.epoch, want):
            raise RuntimeError(
                f"rank {rank}: the train stream is at epoch {epoch}, sample {first}, but this worker "
                f"stands at epoch {state.epoch}, sample {want}: the stream and the restored "
                "checkpoint disagree"
            )
        if skip and (epoch, first) in skip:  # the guard's: a bad step's micro-batch (every rank skips alike)
            state.samples_in_epoch += batch_size * world
            continue
        if extras:
            ids = index.tolist()
            for part in extras:
                part.served(ids)
        yield batch
    raise RuntimeError(
        f"rank {rank}: the train stream ended at epoch {state.epoch}, sample {state.samples_in_epoch} "
        "before train.max_steps"
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
