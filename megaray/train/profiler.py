"""The loop's profiling part: ``megaray train CONFIG --profile 5`` (5 steps, or any number).

An optional loop part (:class:`~megaray.train.extras.Extra`), built on every rank only when the
driver asks for a profile run (``WorkerSpec.profile``, :mod:`megaray.train.spec`).

A profile run is a short diagnostic run of a config, apart from the real one
(:func:`profile_config`): it is named ``<name>-profile`` (its own run folder and MLflow run, so a
real run of the same name is never touched), trains ``PROFILE_WARMUP + STEPS`` optimizer steps
from scratch, and writes no checkpoints and runs no evaluation (the last step's evaluation and
checkpoint would otherwise land inside the profiled window).

On rank 0 the :class:`Profiler` runs ``torch.profiler.profile`` over the whole loop with
``schedule(wait=0, warmup=PROFILE_WARMUP, active=STEPS)``: the first steps (Ray Data's first
reads, allocator growth, DeepSpeed's first step) are run but not recorded, then STEPS steps are
(CPU activity, and CUDA when the worker has a GPU; ``record_shapes``, ``profile_memory``,
``with_flops``). The other ranks train normally. Once the last recorded step ends, rank 0 writes
into ``<run folder>/profile/``:

* ``trace.json``: the Chrome trace (``export_chrome_trace``; ``traceEvents``), for
  ``chrome://tracing`` or https://ui.perfetto.dev;
* ``operators.txt``: the top 25 operators by self time (CUDA time on GPUs, CPU time otherwise)
  and the top 15 by self memory (``key_averages().table``);

logs both to the MLflow run as artifacts under ``profile/`` and prints where they are. On
``s3://``/``gs://`` storage they are written locally first and copied into the run folder.

Each step is one ``ProfilerStep#N`` range in the trace: every micro-batch of the step (data wait,
collate, forward, backward, optimizer step) and the loop's parts that ran after it (the progress
report every ``train.log_every`` steps).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional

from megaray.config import ConfigError, RunConfig
from megaray.train.extras import Extra

log = logging.getLogger("megaray.profiler")

#: optimizer steps run before the recorded ones (``torch.profiler.schedule(warmup=...)``)
PROFILE_WARMUP = 2
#: suffix of a profile run's name
SUFFIX = "-profile"
#: folder of the run folder (and MLflow artifact folder) that holds the profile
FOLDER = "profile"
TRACE_FILE = "trace.json"
TABLE_FILE = "operators.txt"
#: rows of the operator tables (by time, by memory)
TIME_ROWS, MEMORY_ROWS = 25, 15


def profile_config(cfg: RunConfig, steps: int) -> RunConfig:
    """The profile run of ``cfg``: a copy named ``<name>-profile`` that trains ``PROFILE_WARMUP +
    steps`` optimizer steps and registers no model.

    Raises:
        ConfigError: ``steps`` < 1.
    """
    if steps < 1:
        raise ConfigError(f"--profile must be >= 1 step, got {steps}")
    out = cfg.model_copy(deep=True)
    out.name = f"{cfg.name}{SUFFIX}"
    out.train.max_steps = PROFILE_WARMUP + steps
    out.tracking.register_model = None
    return out


def profile_tags(steps: int) -> Dict[str, str]:
    """MLflow tags of a profile run."""
    return {"megaray.profile_steps": str(steps), "megaray.profile_warmup": str(PROFILE_WARMUP)}


class Profiler(Extra):
    """A profile run's loop part: rank 0's ``torch.profiler`` over ``warmup`` + ``steps``
    optimizer steps; on every rank, no evaluation and no checkpoints
    (``pauses_eval_and_checkpoints``).

    Args:
        steps: optimizer steps recorded.
        run_dir: ``<storage_path>/<name>`` (local path or URI): the files go to its ``profile/``.
        device: the worker's device (CUDA activity is recorded on a CUDA device).
        say: a console line (the :class:`~megaray.train.reporter.Reporter`'s ``say``).
        logger: the run's :class:`~megaray.train.mlflow.RunLogger` (artifacts; a no-op when off).
        warmup: optimizer steps run first, not recorded.
        record: whether this rank records (rank 0); the other ranks only pause evaluation and
            checkpoints, the same on every rank.

    :meth:`start` before the first micro-batch, :meth:`after_step` after every optimizer step,
    :meth:`close` when the loop ends. ``files`` holds ``{"trace", "table"}`` once written.
    """

    pauses_eval_and_checkpoints = True

    def __init__(
        self,
        steps: int,
        run_dir: Optional[str],
        device: Any,
        say: Any,
        logger: Any,
        warmup: int = PROFILE_WARMUP,
        record: bool = True,
    ):
        import torch

        self.steps, self.warmup, self.run_dir, self.say, self.logger = steps, warmup, run_dir, say, logger
        self.record = record
        self.cuda = getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available()
        self.files: Dict[str, str] = {}
        self._prof: Optional[Any] = None

    def start(self, state: Any = None, modules: Optional[Mapping[str, Any]] = None) -> None:
        """Start recording (rank 0; :meth:`Extra.start`'s arguments are not needed)."""
        if not self.record:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1),
            on_trace_ready=self._ready,
            record_shapes=True,
            profile_memory=True,
            with_flops=True,
        )
        self._prof.start()

    def after_step(self, step: int) -> None:
        """End of an optimizer step (``prof.step()``); after the last recorded one the files are written."""
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _ready(self, prof: Any) -> None:
        """``on_trace_ready``: write the trace and the tables, log them to MLflow, say where."""
        from megaray import fs

        remote = bool(self.run_dir) and fs.is_uri(self.run_dir)
        local = (
            tempfile.mkdtemp(prefix="megaray-profile-")
            if remote or not self.run_dir
            else os.path.join(self.run_dir, FOLDER)
        )
        os.makedirs(local, exist_ok=True)
        trace, table = os.path.join(local, TRACE_FILE), os.path.join(local, TABLE_FILE)
        prof.export_chrome_trace(trace)
        what = "device" if self.cuda else "cpu"
        averages = prof.key_averages()
        with open(table, "w") as f:
            f.write(
                f"torch.profiler: {self.steps} optimizer step(s) after {self.warmup} warm-up step(s), rank 0 "
                f"({'CPU + CUDA' if self.cuda else 'CPU'})\n\n"
            )
            f.write(f"top {TIME_ROWS} operators by self {what} time\n")
            f.write(averages.table(sort_by=f"self_{what}_time_total", row_limit=TIME_ROWS) + "\n\n")
            f.write(f"top {MEMORY_ROWS} operators by self {what} memory\n")
            f.write(averages.table(sort_by=f"self_{what}_memory_usage", row_limit=MEMORY_ROWS) + "\n")
        self.files = {"trace": trace, "table": table}
        if remote:
            self.files = {
                k: _upload(v, fs.join(self.run_dir, FOLDER, os.path.basename(v))) for k, v in self.files.items()
            }
        try:
            for path in (trace, table):
                self.logger.artifact(path, FOLDER)
        except Exception as e:  # noqa: BLE001 - tracking never stops a run; the files are in the run folder
            self.logger = None
            log.warning("MLflow: the profile was not logged (%s: %s)", type(e).__name__, str(e)[:300])
        if remote:
            shutil.rmtree(local, ignore_errors=True)
        logged = " (and MLflow artifacts profile/)" if getattr(self.logger, "enabled", False) else ""  # None: failed
        self.say(
            f"profile of {self.steps} step(s) after {self.warmup} warm-up: trace {self.files['trace']} "
            f"(chrome://tracing or ui.perfetto.dev), operators {self.files['table']}{logged}"
        )


def _upload(local: str, target: str) -> str:
    import pyarrow.fs as pafs

    from megaray import fs

    filesystem, path = fs.resolve(target)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    return target
