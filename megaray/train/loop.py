"""The one training loop: ``train_loop_per_worker`` run by every Ray Train worker.

Per worker: rebuild the config, build the task's modules, wrap each in a DeepSpeed engine,
restore the latest checkpoint (Ray Train hands it over after a restart or on re-run), then
stream micro-batches from ``ray.train.get_dataset_shard("train")``. Every rank consumes the
same number of micro-batches per epoch (computed on the driver), so collectives never hang on
an uneven last batch. Data order is deterministic per epoch (Ray Data ``preserve_order`` and a
local shuffle seeded with ``seed + epoch``), which is what lets a resumed run skip exactly the
batches it already trained on.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch

from megaray.config import RunConfig
from megaray.families import build_run_config
from megaray.train import checkpoint
from megaray.train.engines import build_engine, resolve_precision

log = logging.getLogger("megaray.train")


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` = ``{"run": resolved config dict, "info": task info,
    "mlflow": {"uri", "run_id"} or None, "debug": {...}}`` (built by :func:`megaray.train.launch.fit`).

    ``debug`` carries two test hooks read from the driver's environment:
    ``MEGARAY_TRACE=path`` appends one JSON line per micro-batch (rank, step, epoch, batch index,
    a fingerprint of the batch, lr) to ``path.rank<r>``; ``MEGARAY_FAULT_AT_STEP=N`` makes rank 0
    raise right after the checkpoint at step N is reported (a crash for resume tests)."""
    import ray.train
    import ray.train.torch

    from megaray import families
    from megaray.train.mlflow import RunLogger

    cfg: RunConfig = build_run_config(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.train.precision, device)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    task = families.task_class(cfg.model.family)(cfg, info=config["info"])
    modules = task.build_modules()
    engines = {}
    for name, module in modules.items():
        module.to(device)
        engines[name], _ = build_engine(module, task.param_groups(name, module), cfg, precision)
    model_engine = engines["model"]

    state = {"step": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": world}
    # Local storage: the newest checkpoint every rank finished (Ray registers reports
    # asynchronously, and a worker killed right after a report can restart before it has).
    # Remote storage (s3://, gs://): the one Ray Train hands over.
    where = checkpoint.latest_complete(config.get("run_dir"), world)
    if where is not None:
        state = checkpoint.load(str(where), engines, rank)
    else:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                state = checkpoint.load(d, engines, rank)
            where = restored.path
    if where is not None and rank == 0:
        print(f"[megaray] resumed from {where} at step {state['step']} "
              f"(epoch {state['epoch']}, batch {state['batch_in_epoch']})", flush=True)

    mlflow_cfg = config.get("mlflow") or {}
    logger = RunLogger(mlflow_cfg.get("uri"), mlflow_cfg.get("run_id")) if rank == 0 else RunLogger(None, None)
    if rank == 0:
        n_params = sum(p.numel() for p in modules["model"].parameters())
        print(f"[megaray] {cfg.model.family} {cfg.model.preset or ''}: {n_params/1e6:.2f}M params, "
              f"world {world}, ZeRO stage {cfg.train.zero_stage}, precision {precision}, "
              f"micro-batch {cfg.data.batch_size} x accum {cfg.train.grad_accum_steps}", flush=True)

    flops_per_unit = task.flops_per_unit(modules)
    peak = cfg.train.peak_flops or _peak_flops(device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    bpe = int(task.info["batches_per_epoch"])
    t = cfg.train
    meter = _Meter()
    pacer = _ReportPacer()
    debug = config.get("debug") or {}
    trace = open(f"{debug['trace']}.rank{rank}", "a") if debug.get("trace") else None
    start_step = state["step"]
    run_t0 = time.perf_counter()

    while state["step"] < t.max_steps:
        if state["batch_in_epoch"] >= bpe:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        batches = _epoch_batches(train_shard, cfg, state["epoch"])
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was trained on
            next(batches)
        while state["batch_in_epoch"] < bpe and state["step"] < t.max_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            batch = task.collate(batch, device)
            pending = _trace_record(batch, state, model_engine) if trace is not None else None
            metrics = task.train_step(engines, batch, state["step"])
            if pending is not None:  # written once the micro-batch has been trained on
                trace.write(pending)
                trace.flush()
            state["batch_in_epoch"] += 1
            state["tokens"] += task.batch_units(batch) * world
            meter.add(metrics, data_s=t1 - t0, total_s=time.perf_counter() - t0, units=task.batch_units(batch) * world)
            if model_engine.global_steps == state["step"]:  # inside a gradient-accumulation window
                continue
            state["step"] = int(model_engine.global_steps)
            step = state["step"]
            report: Dict[str, float] = {}
            last = step >= t.max_steps
            if step % t.log_every == 0 or last:
                report.update(meter.summary(flops_per_unit, peak, world))
                report["lr"] = float(model_engine.get_lr()[0])
                gn = model_engine.get_global_grad_norm()
                if gn is not None:
                    report["grad_norm"] = float(gn)
                report = _mean_across_ranks(report, world)
                meter.reset()
                if rank == 0:
                    elapsed = time.perf_counter() - run_t0
                    eta = elapsed / max(1, step - start_step) * (t.max_steps - step)
                    _print_progress(step, t.max_steps, report, eta, task.unit)
            if step % t.eval_every == 0 or last:
                report.update(_evaluate(task, engines, val_shard, cfg, world))
                if rank == 0:
                    print(f"[megaray] eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("val_")), flush=True)
                    if cfg.train.zero_stage < 3:
                        with tempfile.TemporaryDirectory() as d:
                            texts = task.eval_artifacts(model_engine.module, d, step)
                            if any(os.scandir(d)):
                                logger.artifact(d, f"eval/step_{step:08d}")
                        for key, text in texts.items():
                            logger.text(text, f"{key}/step_{step:08d}.txt")
                            print(f"[megaray] {key} @ {step}: {text!r}", flush=True)
            checkpoint_due = step % t.checkpoint_every == 0 or last
            if not report and not checkpoint_due:
                continue
            report.update(step=step, tokens=state["tokens"], epoch=state["epoch"])
            logger.metrics({k: v for k, v in report.items() if k not in ("step",)}, step)
            if checkpoint_due:
                _report_with_checkpoint(report, engines, state, cfg, rank, task)
                pacer.sent()
            elif any(k.startswith("val_") for k in report) or pacer.due(world):
                ray.train.report(report)
                pacer.sent()
            if debug.get("fault_at_step") and step == int(debug["fault_at_step"]) and rank == 0:
                raise RuntimeError(f"MEGARAY_FAULT_AT_STEP: injected failure after step {step}")
    if state["step"] == start_step and state.get("metrics"):
        # Nothing left to train (a re-run of a finished run, or a Tune trial restarted after it
        # finished but before Tune saved that): hand Ray Train the final report again, so the
        # result and Tune's view of the trial end at max_steps. MLflow already has it.
        if rank == 0:
            print(f"[megaray] run already at step {state['step']} of {t.max_steps}: nothing to train; "
                  "re-reporting its final metrics", flush=True)
        ray.train.report(dict(state["metrics"]))
    if rank == 0:
        paced = f" ({pacer.skipped} progress report(s) kept from Ray Train by pacing; all are in MLflow)" if pacer.skipped else ""
        print(f"[megaray] done: step {state['step']}, {state['tokens']:,} {task.unit}{paced}", flush=True)


def _report_with_checkpoint(report, engines, state, cfg, rank, task) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="megaray-ckpt-") as d:
        # the report goes into megaray.json too: a resumed run with nothing left to train re-reports it
        checkpoint.save(d, engines, dict(state, metrics=dict(report)), cfg, rank, task.checkpoint_files())
        torch.distributed.barrier()
        ray.train.report(
            report,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=checkpoint.checkpoint_dir_name(state["step"]),
        )


def _trace_record(batch, state, engine) -> str:
    """One JSON line: the optimizer step this micro-batch belongs to, its place in the epoch,
    a fingerprint of its contents and the lr it is trained with."""
    import hashlib
    import json

    first = next(iter(batch.values()))
    digest = hashlib.sha1(first.detach().cpu().numpy().tobytes()).hexdigest()[:16]
    return json.dumps({"step": state["step"] + 1, "epoch": state["epoch"], "batch": state["batch_in_epoch"],
                       "fp": digest, "lr": float(engine.get_lr()[0]), "pid": os.getpid()}) + "\n"


def _epoch_batches(shard, cfg: RunConfig, epoch: int) -> Iterator[Mapping[str, torch.Tensor]]:
    return iter(
        shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed + epoch if cfg.data.shuffle_buffer else None,
            prefetch_batches=2,
        )
    )


@torch.no_grad()
def _evaluate(task, engines, val_shard, cfg: RunConfig, world: int) -> Dict[str, float]:
    """Mean of the task's eval metrics over ``info["val_batches"]`` batches per rank, averaged
    across ranks (every rank runs the same number of forwards: ZeRO-3 gathers need that)."""
    model = engines["model"]
    model.eval()
    sums: Dict[str, float] = {}
    n = int(task.info["val_batches"])
    it = iter(val_shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True))
    for _ in range(n):
        batch = task.collate(next(it), model.device)
        for k, v in task.eval_step(model, batch).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train()
    means = _mean_across_ranks({k: v / n for k, v in sums.items()}, world)
    return task.finalize_eval(means)


def _mean_across_ranks(values: Dict[str, float], world: int) -> Dict[str, float]:
    if world == 1 or not values or not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live: NCCL (Ray Train's backend with GPUs)
    only takes CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _ReportPacer:
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
            go = go.to(_collective_device())
            torch.distributed.broadcast(go, src=0)
        if not go.item():
            self.skipped += 1
        return bool(go.item())

    def sent(self) -> None:
        self.last = time.monotonic()


class _Meter:
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
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        rate = self.units / self.total_s if self.total_s else 0.0
        out["throughput"] = rate
        out["data_wait_frac"] = self.data_s / self.total_s if self.total_s else 0.0
        if flops_per_unit and peak:
            out["mfu"] = flops_per_unit * rate / (peak * world)
        return out


def _print_progress(step: int, max_steps: int, m: Mapping[str, float], eta_s: float, unit: str) -> None:
    mfu = f"{m['mfu']*100:.1f}%" if "mfu" in m else "n/a"
    parts = [f"step {step}/{max_steps}", f"loss {m.get('loss', float('nan')):.4f}", f"lr {m.get('lr', 0):.2e}"]
    if "grad_norm" in m:
        parts.append(f"gnorm {m['grad_norm']:.2f}")
    parts += [f"{m['throughput']:,.0f} {unit}/s", f"MFU {mfu}", f"data-wait {m['data_wait_frac']*100:.0f}%",
              f"ETA {_fmt_s(eta_s)}"]
    print("[megaray] " + " | ".join(parts), flush=True)


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _peak_flops(device: torch.device) -> Optional[float]:
    try:
        from megaray.models.gpt.flops import peak_flops
    except ImportError:
        return None
    return peak_flops(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
