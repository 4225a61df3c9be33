"""The loop's reporting part: meter, progress lines, tracked metrics and paced Ray Train reports.

Per optimizer step the loop asks :meth:`Reporter.progress` (due every ``train.log_every`` steps
and at the last step: averaged metrics, lr, grad norm, throughput, data wait, MFU, all averaged
across ranks) and hands the step's report to :meth:`Reporter.publish`, which logs it to the run's
trackers (rank 0, every logged step: MLflow, and TensorBoard / W&B when on,
:mod:`megaray.train.trackers`) and to Ray Train: with a checkpoint when one is due, with
validation metrics always, and otherwise no more often than the controller drains reports
(:class:`ReportPacer`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from megaray.train.mlflow import RunLogger
from megaray.train.trackers import MLflowTracker, Trackers


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: NCCL (Ray Train's backend with GPUs)
    only takes CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: Name prefixes of bookkeeping metrics: how much of each kind the batches held, not how well the
#: model did (``rows/<task>``, ``supervised/<modality>``: :mod:`megaray.tasks.multimodal`; with
#: ``val_`` in evaluation). They are logged to the trackers but left off the console's eval line.
COUNT_PREFIXES = ("rows/", "supervised/")


def is_count(key: str) -> bool:
    """True for a bookkeeping metric (:data:`COUNT_PREFIXES`, with or without ``val_``)."""
    return key.removeprefix("val_").startswith(COUNT_PREFIXES)


def ratio_metrics(values: Dict[str, float]) -> Dict[str, float]:
    """Each ``<name>_sum`` / ``<name>_count`` pair -> ``<name>`` (their ratio); the pair is dropped
    (a task that wants the count logged reports it again under its own name).

    Both are averaged alike over micro-batches and ranks, so the ratio is the count-weighted mean
    over all of them (a per-modality loss of micro-batches that only sometimes hold that modality:
    :mod:`megaray.tasks.multimodal`); a pair whose count is 0 gives no ``<name>``."""
    out = dict(values)
    for key in [k for k in values if k.endswith("_sum") and k[:-4] + "_count" in values]:
        total, count = out.pop(key), out.pop(key[:-4] + "_count")
        if count > 0:
            out[key[:-4]] = total / count
    return out


def mean_across_ranks(values: Dict[str, float], world: int) -> Dict[str, float]:
    """Average scalar metrics over ``world`` ranks (all-reduce in float64). Collective."""
    if world == 1 or not values or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class ReportPacer:
    """Decides whether a metrics-only progress report goes to Ray Train (and so to Tune).

    Ray Train V2's controller takes one report per worker every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
    (2 s by default; ``ray/train/v2/_internal/execution/controller/controller.py``) and a worker's
    result queue holds one, so a report made sooner blocks the training loop until the next poll:
    with ``log_every`` steps taking under 2 s that cost up to 25% of steps/s (measured with
    ``benchmarks/trainer_overhead.py``). Progress reports are therefore sent at most that often;
    reports with a checkpoint or validation metrics always go, and MLflow gets every logged step.
    Rank 0's clock decides and the decision is broadcast, since every rank must make the same
    sequence of ``ray.train.report`` calls.
    """

    def __init__(self) -> None:
        self.interval_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
        self.last = -math.inf
        self.skipped = 0

    def due(self, world: int) -> bool:
        go = torch.tensor([float(time.monotonic() - self.last >= self.interval_s)])
        if world > 1 and torch.distributed.is_initialized():
            go = go.to(collective_device())
            torch.distributed.broadcast(go, src=0)
        if not go.item():
            self.skipped += 1
        return bool(go.item())

    def sent(self) -> None:
        self.last = time.monotonic()


class Meter:
    """Accumulates per-micro-batch metrics and timings between progress lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, float] = {}
        self.n = 0
        self.data_s = self.total_s = 0.0
        self.units = 0

    def add(self, metrics: Mapping[str, float], data_s: float, total_s: float, units: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.data_s += data_s
        self.total_s += total_s
        self.units += units

    def summary(self, flops_per_unit: Optional[float], peak: Optional[float], world: int) -> Dict[str, float]:
        """Mean metrics, ``throughput`` (units/s, all ranks), ``data_wait_frac`` and, when the
        FLOPs per unit and the peak FLOP/s are known, ``mfu`` (PaLM appendix B)."""
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        rate = self.units / self.total_s if self.total_s else 0.0
        out["throughput"] = rate
        out["data_wait_frac"] = self.data_s / self.total_s if self.total_s else 0.0
        if flops_per_unit and peak:
            out["mfu"] = flops_per_unit * rate / (peak * world)
        return out


#: Where the run's time accounting (:class:`TimeAccount`) is logged: under ``system/``. MLflow's UI
#: (3.x, ``RunsChartsSetupUtils.getBaseChartAndSectionConfigs`` in ``mlflow/server/js``) draws one
#: chart section per metric-name prefix (``time/step_s`` -> section ``time``), sorts those sections
#: by name and puts every one of them *above* the section of un-prefixed metrics (``loss``,
#: ``val_loss``, ...); only ``system/`` metrics come after it (and on a run's page they move to the
#: System metrics tab, beside MLflow's own CPU and memory charts, over wall time). No other prefix
#: sorts after the losses.
SYSTEM_PREFIX = "system/"
#: the goodput metric (compute seconds / wall seconds)
GOODPUT = SYSTEM_PREFIX + "goodput"


def time_key(bucket: str) -> str:
    """The metric of a cumulative time bucket: ``time_key("step") == "system/time_step_s"``
    (buckets: ``step``, ``data_wait``, ``eval``, ``checkpoint``, ``resize``, ``startup``, ``wall``)."""
    return f"{SYSTEM_PREFIX}time_{bucket}_s"


class TimeAccount:
    """Where a run's wall time went, for goodput (issue: a run spends its time training).

    ``run_t0``: wall-clock (``time.time()``) when the driver's ``fit`` started; every figure is
    cumulative since then, across restarts of the worker group within one ``fit``.

    Metrics (:meth:`metrics`, named by :data:`GOODPUT` and :func:`time_key`): ``system/goodput`` =
    seconds inside optimizer-step compute (forward, backward, step; data wait excluded) / wall
    seconds since ``run_t0``; ``system/time_startup_s`` = ``run_t0`` to this attempt's first trained
    micro-batch; ``system/time_step_s``, ``system/time_data_wait_s``, ``system/time_eval_s``,
    ``system/time_checkpoint_s``: seconds spent in each; ``system/time_resize_s``: seconds this
    attempt spent converting a checkpoint written at another world size (DeepSpeed universal
    checkpoint; an elastic restart's own start-up is ``system/time_startup_s``);
    ``system/time_wall_s``.
    """

    def __init__(self, run_t0: Optional[float]):
        self.run_t0 = run_t0 if run_t0 is not None else time.time()
        self.startup_s: Optional[float] = None
        self.spent: Dict[str, float] = {"step": 0.0, "data_wait": 0.0, "eval": 0.0, "checkpoint": 0.0, "resize": 0.0}

    def micro_batch(self, data_s: float, compute_s: float) -> None:
        if self.startup_s is None:
            self.startup_s = time.time() - data_s - compute_s - self.run_t0
        self.spent["data_wait"] += data_s
        self.spent["step"] += compute_s

    def add(self, what: str, seconds: float) -> None:
        self.spent[what] = self.spent.get(what, 0.0) + seconds

    def metrics(self) -> Dict[str, float]:
        wall = max(1e-9, time.time() - self.run_t0)
        out = {time_key(k): v for k, v in self.spent.items()}
        out.update({time_key("wall"): wall, GOODPUT: self.spent["step"] / wall})
        if self.startup_s is not None:
            out[time_key("startup")] = self.startup_s
        return out

    def summary(self) -> str:
        m = self.metrics()
        parts = [f"goodput {m[GOODPUT] * 100:.0f}% of {fmt_s(m[time_key('wall')])}"]
        if self.startup_s is not None:
            parts.append(f"startup {self.startup_s:.1f}s")
        parts += [f"{k} {self.spent[k]:.1f}s" for k in ("step", "data_wait", "eval", "checkpoint")]
        if self.spent["resize"]:
            parts.append(f"resize {self.spent['resize']:.1f}s")
        return "time: " + ", ".join(parts)


class Reporter:
    """Progress lines, tracked metrics and Ray Train reports of one worker.

    Args:
        cfg_train: ``cfg.train`` (``log_every``, ``max_steps``).
        logger: MLflow logger (a no-op one on ranks other than 0).
        rank, world: this worker's rank and the world size.
        unit: what throughput counts (``tokens``, ``samples``).
        flops_per_unit, peak: for MFU (None: not reported).
        start_step: the step this attempt started at (for the ETA).
        run_t0: ``time.time()`` when the driver's ``fit`` started (for :class:`TimeAccount`).
        channel: the driver's :class:`~megaray.train.console.Channel` (rank 0's lines and
            progress go there instead of stdout), or None.
        trackers: where rank 0 logs metrics and eval files (:func:`megaray.train.trackers.open_trackers`);
            None: MLflow through ``logger`` only.
    """

    def __init__(
        self,
        cfg_train: Any,
        logger: RunLogger,
        rank: int,
        world: int,
        unit: str,
        flops_per_unit: Optional[float],
        peak: Optional[float],
        start_step: int,
        run_t0: Optional[float] = None,
        channel: Optional[Any] = None,
        trackers: Optional[Trackers] = None,
    ):
        self.t, self.logger, self.rank, self.world, self.unit = cfg_train, logger, rank, world, unit
        if trackers is None:
            trackers = Trackers([MLflowTracker(logger)] if rank == 0 and logger.enabled else [])
        self.trackers = trackers
        self.channel = channel if rank == 0 else None
        self.flops_per_unit, self.peak, self.start_step = flops_per_unit, peak, start_step
        self.meter, self.pacer = Meter(), ReportPacer()
        self.time = TimeAccount(run_t0)
        self.t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.t.log_every == 0 or step >= self.t.max_steps

    def progress(self, engines: Mapping[str, Any], step: int) -> Dict[str, float]:
        """The progress metrics since the last line (averaged across ranks; collective), printed
        by rank 0. ``lr`` / ``grad_norm`` are the model's; other modules add ``lr_<name>``."""
        report = self.meter.summary(self.flops_per_unit, self.peak, self.world)
        report.update(self.time.metrics())
        for name, engine in engines.items():
            report["lr" if name == "model" else f"lr_{name}"] = float(engine.get_lr()[0])
        gn = engines["model"].get_global_grad_norm()
        if gn is not None:
            report["grad_norm"] = float(gn)
        report = ratio_metrics(mean_across_ranks(report, self.world))
        # an elastic run's size over steps (the global batch stays; the accumulation follows)
        report.update(world_size=float(self.world), grad_accum_steps=float(self.t.grad_accum_steps))
        self.meter.reset()
        eta = (time.perf_counter() - self.t0) / max(1, step - self.start_step) * (self.t.max_steps - step)
        if self.rank == 0 and self.channel is not None:
            self.channel.send("progress", {**report, "step": step, "eta_s": eta})
        elif self.rank == 0:
            self._print_progress(step, report, eta)
        return report

    def publish(
        self,
        report: Dict[str, float],
        step: int,
        state: Any,
        checkpoint: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> None:
        """Log ``report`` (plus step, tokens, epoch) to the trackers and report it to Ray Train:
        through ``checkpoint(report)`` when given, else now if it holds validation metrics or
        the pacer allows. Every rank calls it with the same arguments."""
        import ray.train

        report.update(step=step, tokens=state.tokens, epoch=state.epoch)
        self.trackers.log_metrics(step, {k: v for k, v in report.items() if k != "step"})
        if checkpoint is not None:
            checkpoint(report)
            self.pacer.sent()
        elif any(k.startswith("val_") for k in report) or self.pacer.due(self.world):
            ray.train.report(report)
            self.pacer.sent()

    def log_eval_files(self, folder: str, step: int, texts: Mapping[str, str]) -> None:
        """Rank 0: an evaluation's files and texts to the trackers (images and audio to each; other
        files to MLflow only, under ``eval/step_<step>``)."""
        if self.rank != 0:
            return
        for path in self.trackers.log_folder(folder, step):
            self.logger.artifact(
                path, MLflowTracker.artifact_dir("eval/" + os.path.relpath(path, folder).replace(os.sep, "/"), step)
            )
        for key, text in texts.items():
            self.trackers.log_text(key, text, step)

    def close(self) -> None:
        """Close the trackers (W&B finishes its run, TensorBoard flushes its files)."""
        self.trackers.close()

    def say(self, line: str) -> None:
        """A console line from rank 0 (to the driver's console when there is one)."""
        if self.rank == 0 and self.channel is not None:
            self.channel.send("line", line)
        elif self.rank == 0:
            print(f"[megaray] {line}", flush=True)

    def _print_progress(self, step: int, m: Mapping[str, float], eta_s: float) -> None:
        mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
        parts = [
            f"step {step}/{self.t.max_steps}",
            f"loss {m.get('loss', float('nan')):.4f}",
            f"lr {m.get('lr', 0):.2e}",
        ]
        if "grad_norm" in m:
            parts.append(f"gnorm {m['grad_norm']:.2f}")
        parts += [
            f"{m['throughput']:,.0f} {self.unit}/s",
            f"MFU {mfu}",
            f"data-wait {m['data_wait_frac'] * 100:.0f}%",
            f"ETA {fmt_s(eta_s)}",
        ]
        self.say(" | ".join(parts))


def fmt_s(s: float) -> str:
    """``75 -> "1m15s"``, ``3700 -> "1h01m"``."""
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
