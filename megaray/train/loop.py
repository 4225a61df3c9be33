"""The one training loop: ``train_loop_per_worker`` run by every Ray Train worker.

Per worker: rebuild the config, find the checkpoint this worker group resumes from (its
``megaray.json`` only), take the run's global batch and derive the accumulation for this world
size, let rank 0 build the task's positioned train stream at the checkpoint's cursor and split it
over the ranks (:func:`_positioned_shard`; reading starts while DeepSpeed builds), build the task's
modules, wrap each in a DeepSpeed engine and restore the checkpoint (through DeepSpeed's universal
form at another world size). The parts decide for themselves when they are due: the
:class:`~megaray.train.reporter.Reporter` (progress, MLflow, paced Ray reports), the
:class:`~megaray.train.evaluator.Evaluator` and the :class:`~megaray.train.checkpoint.Checkpointer`;
the task owns the step clock and the ``after_step`` hook; the :class:`~megaray.train.ema.EMA`
follows every optimizer step. A profile run (``config["profile"]``: steps) adds rank 0's
:class:`~megaray.train.profiler.Profiler` and turns evaluation and checkpoints off on every rank.

Every rank consumes the same number of micro-batches per epoch, so collectives never hang on an
uneven last batch, and the ``world x batch_size x accum`` samples of an optimizer step are the
same global batch at any world size (:mod:`megaray.data.order`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch

from megaray.config import RunConfig
from megaray.train.checkpoint import Checkpointer, TrainState, init_weights


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` = ``{"run": resolved config dict, "info": TaskInfo,
    "mlflow": {"uri", "run_id"}, "trackers": {...} (:func:`megaray.train.trackers.prepare`), "run_dir": str,
    "debug": {...}}`` (from :func:`megaray.train.launch.fit`).

    ``debug`` carries the test hooks read from the driver's environment (:class:`Debug`)."""
    import ray.train

    w = _Worker(config)
    cfg, task, engines, state = w.cfg, w.task, w.engines, w.state
    t = cfg.train
    start_step = state.step
    batches = positioned_batches(w.head, cfg.data.batch_size, state, w.rank, w.world, w.debug)
    if w.profiler is not None:
        w.profiler.start()
    while state.step < t.max_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        batch = task.collate(batch, w.device)
        w.debug.before(batch, state, engines["model"])
        metrics = task.train_step(engines, batch, state.step)
        w.debug.after(metrics.get("loss"))
        units = task.batch_units(batch) * w.world
        state.samples_in_epoch += cfg.data.batch_size * w.world
        state.tokens += units
        t2 = time.perf_counter()
        w.reporter.meter.add(metrics, data_s=t1 - t0, total_s=t2 - t0, units=units)
        w.reporter.time.micro_batch(data_s=t1 - t0, compute_s=t2 - t1)
        step = task.global_step(engines)
        if step == state.step:  # inside a gradient-accumulation window
            continue
        state.step = step
        w.end_of_step(step)
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
    if w.profiler is not None:
        w.profiler.close()
    w.reporter.close()


class _Worker:
    """One worker's run: config, task, engines, EMA and the parts, set up in that order."""

    def __init__(self, config: Dict[str, Any]):
        import ray.train
        import ray.train.torch

        from megaray import families
        from megaray.families import build_run_config
        from megaray.train.device import peak_flops
        from megaray.train.engines import build_engines, resolve_precision
        from megaray.train.evaluator import Evaluator
        from megaray.train.mlflow import RunLogger
        from megaray.train.reporter import Reporter
        from megaray.train.trackers import open_trackers

        self.cfg = cfg = build_run_config(config["run"])
        ctx = ray.train.get_context()
        self.rank, self.world = rank, world = ctx.get_world_rank(), ctx.get_world_size()
        self.debug = Debug(config.get("debug") or {}, rank)
        # where this group resumes (read before anything is built: the stream starts at its cursor)
        self.checkpointer = Checkpointer(cfg, config.get("run_dir"), rank, world)
        source, saved = self.checkpointer.locate()
        if world > 1:  # every rank restores what rank 0 found (a checkpoint can land between two listings)
            box = [(source, saved)]
            torch.distributed.broadcast_object_list(box, src=0)
            source, saved = box[0]
        # the global batch is the run's, at any world size; the accumulation follows from it
        info = config["info"].for_world(world, saved.global_batch if saved is not None and saved.global_batch else None)
        if info.plan is not None:
            cfg.train.grad_accum_steps = info.plan.accum(world)  # ConfigError when world cannot divide it
        self.task = task = families.task_class(cfg.model.family, cfg.train.task)(cfg, info=info)
        # a positioned stream: rank 0 builds it at the restored cursor and splits it over the ranks;
        # reading starts now, while the engines build (fast start)
        self.head = Prefetch(
            _positioned_shard(task, saved, rank, world).iter_torch_batches(
                batch_size=cfg.data.batch_size, drop_last=True, prefetch_batches=2
            )
        )
        _seed_everything(cfg.train.seed + rank)
        self.device = device = ray.train.torch.get_device()
        precision = resolve_precision(cfg.train.precision, device)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

        modules = task.build_modules()
        if cfg.train.init_from:  # fine-tuning: start from another run's weights
            init_weights(modules["model"], cfg.train.init_from)
        self.engines = build_engines(task, modules, cfg, precision, device)
        frozen = {name: m.to(device).eval().requires_grad_(False) for name, m in task.frozen_modules().items()}
        self.ema = _ema(cfg, modules["model"])
        self.checkpointer.extra_files = task.checkpoint_files() if rank == 0 else {}
        self.state, where = self.checkpointer.restore(self.engines, source, self.ema)
        self.state.world_size = world
        if info.plan is not None:
            self.state.global_batch = info.plan.global_batch
        self.debug.started(self.state, modules)

        mlflow_cfg = config.get("mlflow") or {}
        logger = RunLogger(mlflow_cfg.get("uri"), mlflow_cfg.get("run_id")) if rank == 0 else RunLogger(None, None)
        logger.start_system_metrics(cfg.tracking.system_metrics_interval_s)  # no-op off rank 0
        if logger.enabled and cfg.tracking.log_checkpoints:  # rank 0: every checkpoint an MLflow LoggedModel
            from megaray.train.logged_models import CheckpointModels

            self.checkpointer.on_saved = CheckpointModels(logger, cfg.name, cfg.model.family, cfg.model.preset)
        trackers = open_trackers(config.get("trackers") or {}, logger, rank, cfg.flat(), self.state.step)
        self.reporter = Reporter(
            cfg.train,
            logger,
            rank,
            world,
            task.unit,
            task.flops_per_unit(modules),
            cfg.train.peak_flops or peak_flops(device),
            self.state.step,
            config.get("t0"),
            config.get("console"),
            trackers,
        )
        self.evaluator = Evaluator(task, cfg, ray.train.get_dataset_shard("val"), world, frozen, self.ema)
        # a profile run: rank 0 records its steps; no rank evaluates or checkpoints (the same on every rank)
        self.profiling = bool(config.get("profile"))
        self.profiler = None
        if self.profiling and rank == 0:
            from megaray.train.profiler import Profiler

            self.profiler = Profiler(int(config["profile"]), config.get("run_dir"), device, self.reporter.say, logger)
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

    def end_of_step(self, step: int) -> None:
        """After optimizer step ``step``: the task's hook, the EMA, then whichever parts are due."""
        self.task.after_step(self.engines, step)
        if self.ema is not None:
            self.ema.update(self.engines["model"].module)
        report: Dict[str, float] = {}
        if self.reporter.due(step):
            report.update(self.reporter.progress(self.engines, step))
        clock = self.reporter.time
        if not self.profiling and self.evaluator.due(step):
            t0 = time.perf_counter()
            report.update(self.evaluator.run(self.engines, step, self.reporter))
            clock.add("eval", time.perf_counter() - t0)
            self.debug.evaluated(step, self.evaluator.reads)
        save = not self.profiling and self.checkpointer.due(step)
        if report or save:
            checkpoint = self._save if save else None
            self.reporter.publish(report, step, self.state, checkpoint)
        if self.profiler is not None:
            self.profiler.step()
        self.debug.after_step(step)

    def _save(self, report: Dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.checkpointer.save_and_report(report, self.engines, self.state, self.ema)
        self.reporter.time.add("checkpoint", time.perf_counter() - t0)


def _ema(cfg: RunConfig, model: torch.nn.Module) -> Optional[Any]:
    if cfg.train.ema_decay is None:
        return None
    from megaray.train.ema import EMA

    return EMA(model, cfg.train.ema_decay)


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


def _positioned_shard(task: Any, saved: Optional[TrainState], rank: int, world: int) -> Any:
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
    batches: Any, batch_size: int, state: TrainState, rank: int, world: int, debug: Optional["Debug"] = None
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Micro-batches of a positioned stream (:meth:`megaray.tasks.base.Task.train_stream`) from
    where ``state`` stands, checked against the stream's ``epoch``/``index`` columns (removed).

    The next micro-batch of rank ``r`` must start at served position ``state.samples_in_epoch +
    r * batch_size`` (the global cursor; :mod:`megaray.data.order`); a stream at another position
    raises RuntimeError. The served positions go to ``debug.ids`` (the trace). The caller
    advances ``state.samples_in_epoch`` by ``world * batch_size`` after training on a batch."""
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
        if debug is not None:
            debug.ids = index.tolist()
        yield batch
    raise RuntimeError(
        f"rank {rank}: the train stream ended at epoch {state.epoch}, sample {state.samples_in_epoch} "
        "before train.max_steps"
    )


class Debug:
    """Test hooks read from the driver's environment by :func:`megaray.train.launch.fit`.

    ``MEGARAY_TRACE=path``: one JSON line per micro-batch (step, epoch, the global cursor before
    it, its served sample positions, the world size, a fingerprint of the batch, lr, pid, batches
    replayed to reach the resume position, the micro-batch's loss) appended to ``path.rank<r>`` once it has been trained on, one line per worker start (pid, the step it starts at, the L1 norm of each module's
    weights after restore) to ``path.starts.rank<r>``, and one per evaluation (step, Ray Data
    executions of the validation split so far) to ``path.evals.rank<r>``.
    ``MEGARAY_FAULT_AT_STEP=N``: rank 0 raises right after step N's reports (a crash for
    resume tests).
    ``MEGARAY_STEP_SLEEP_S=s``: every rank sleeps ``s`` seconds after each optimizer step (a slow
    run, so the elastic tests can change the cluster while it trains).
    """

    def __init__(self, debug: Mapping[str, Any], rank: int):
        self.path, self.rank = debug.get("trace"), rank
        self.fault_at = int(debug["fault_at_step"]) if debug.get("fault_at_step") else None
        self.step_sleep = float(debug.get("step_sleep_s") or 0.0)
        self.trace = open(f"{self.path}.rank{rank}", "a") if self.path else None
        self.pending: Optional[Dict[str, Any]] = None
        self.replayed = 0  # batches read again to reach the resume position
        self.ids: Optional[list] = None  # served positions of the current micro-batch (positioned streams)

    def started(self, state: TrainState, modules: Mapping[str, torch.nn.Module]) -> None:
        if self.path:
            weights = {
                name: float(sum(p.detach().double().abs().sum() for p in m.parameters())) for name, m in modules.items()
            }
            with open(f"{self.path}.starts.rank{self.rank}", "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": state.step, "weights_l1": weights}) + "\n")

    def evaluated(self, step: int, reads: int) -> None:
        """One line per evaluation to ``path.evals.rank<r>``: the step and how many times this
        rank has executed the validation pipeline so far."""
        if self.path:
            with open(f"{self.path}.evals.rank{self.rank}", "a") as f:
                f.write(json.dumps({"step": step, "val_reads": reads, "pid": os.getpid()}) + "\n")

    def before(self, batch: Mapping[str, torch.Tensor], state: TrainState, engine: Any) -> None:
        if self.trace is None:
            return
        first = next(iter(batch.values()))
        digest = hashlib.sha1(first.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        self.pending = {
            "step": state.step + 1,
            "epoch": state.epoch,
            "cursor": state.samples_in_epoch,
            "fp": digest,
            "lr": float(engine.get_lr()[0]),
            "pid": os.getpid(),
            "replayed": self.replayed,
            "ids": self.ids,
            "world": state.world_size,
            "t": time.time(),
        }

    def after(self, loss: Optional[float] = None) -> None:
        if self.trace is not None and self.pending is not None:
            self.trace.write(json.dumps({**self.pending, "loss": loss}) + "\n")
            self.trace.flush()
            self.pending = None

    def after_step(self, step: int) -> None:
        if self.fault_at is not None and step == self.fault_at and self.rank == 0:
            raise RuntimeError(f"MEGARAY_FAULT_AT_STEP: injected failure after step {step}")
        if self.step_sleep:
            time.sleep(self.step_sleep)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
