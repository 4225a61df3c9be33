"""What the driver hands each Ray Train worker: a :class:`WorkerSpec`.

The hand-offs of a run, each typed::

    driver (launch.fit) --WorkerSpec--> worker (loop.train_loop_per_worker) --engines--> Task
                                        RunConfig, TaskInfo, ...            Mapping[str, Engine]

Ray Train's ``train_loop_config`` must be a dict, so the driver sends ``{"spec": WorkerSpec}``
(:meth:`WorkerSpec.loop_config`) and the worker reads it back with :meth:`WorkerSpec.of`. Ray
pickles it to every worker: plain data, plus the console's queue handle.

The driver asks for optional loop parts here and only here: ``profile`` (a profile run,
:mod:`megaray.train.profiler`) and ``debug`` (the test hooks of :class:`DebugHooks`, read from the
driver's environment). A normal run has neither, and its workers build and call nothing for them
(:mod:`megaray.train.extras`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Set, Tuple

from megaray.errors import ConfigError
from megaray.tasks.base import TaskInfo

if TYPE_CHECKING:
    from megaray.config import RunConfig
    from megaray.train.console import Channel

#: the one key of Ray Train's ``train_loop_config``
SPEC_KEY = "spec"

#: the test hooks' environment variables (read on the driver by :meth:`DebugHooks.from_env`)
TRACE_ENV, FAULT_ENV, SLEEP_ENV = "MEGARAY_TRACE", "MEGARAY_FAULT_AT_STEP", "MEGARAY_STEP_SLEEP_S"
POISON_ENV, SKIP_ENV = "MEGARAY_POISON_STEPS", "MEGARAY_SKIP_SAMPLES"
HANG_ENV, SLOW_RANK_ENV = "MEGARAY_HANG_AT_STEP", "MEGARAY_SLOW_RANK"


@dataclass(frozen=True)
class DebugHooks:
    """Test hooks read from the driver's environment (tests, benchmarks, the cluster tests).

    Attributes:
        trace: ``MEGARAY_TRACE=path``: every rank writes a JSON line per micro-batch, per worker
            start and per evaluation (:class:`megaray.train.extras.Trace`).
        fault_at_step: ``MEGARAY_FAULT_AT_STEP=N``: rank 0 raises right after step N's reports
            and checkpoint (a crash, for resume tests).
        step_sleep_s: ``MEGARAY_STEP_SLEEP_S=s``: every rank sleeps ``s`` seconds after each
            optimizer step (a slow run, so the elastic tests can change the cluster meanwhile).
        poison: ``MEGARAY_POISON_STEPS="6:nan,9:spike"``: the first micro-batch of the first
            attempt at step 6 has its loss multiplied by NaN, step 9's by 1000 (``9:x50``: by 50),
            on every rank, for the guard's tests (:class:`megaray.train.extras.Poison`).
        skip_samples: ``MEGARAY_SKIP_SAMPLES="0:16-19,0:40-43"``: ``epoch:position`` (or
            ``epoch:first-last``) of micro-batches every rank skips from the start, as the guard
            skips a bad step's (:attr:`megaray.train.guard.Guard.skips`): the clean run of the
            guard's test. Whole global batches only (every rank must skip alike).
        hang_at: ``MEGARAY_HANG_AT_STEP="1:12"``: ``(rank, step)``: that rank blocks forever at
            the first micro-batch of step 12, in a worker that started the run from step 0 only,
            so the restarted group trains on (:class:`megaray.train.extras.Hang`; the watchdog's test).
        slow_rank: ``MEGARAY_SLOW_RANK="1:0.3"``: ``(rank, seconds)``: that rank sleeps 0.3 s after
            each optimizer step (a straggler, for :mod:`megaray.train.stragglers`' test).
    """

    trace: Optional[str] = None
    fault_at_step: Optional[int] = None
    step_sleep_s: float = 0.0
    poison: Tuple[Tuple[int, float], ...] = ()
    skip_samples: Tuple[Tuple[int, int], ...] = ()
    hang_at: Optional[Tuple[int, int]] = None
    slow_rank: Optional[Tuple[int, float]] = None

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Optional["DebugHooks"]:
        """The hooks ``env`` (default ``os.environ``) asks for; None when it asks for none.

        Raises:
            ConfigError: ``MEGARAY_FAULT_AT_STEP`` is not an integer, ``MEGARAY_STEP_SLEEP_S``
                not a number, ``MEGARAY_POISON_STEPS`` / ``MEGARAY_SKIP_SAMPLES`` /
                ``MEGARAY_HANG_AT_STEP`` / ``MEGARAY_SLOW_RANK`` not of their shape (names the
                variable and its value).
        """
        env = os.environ if env is None else env
        trace, fault, sleep = (env.get(k) or None for k in (TRACE_ENV, FAULT_ENV, SLEEP_ENV))
        poison_raw, skip_raw = env.get(POISON_ENV) or "", env.get(SKIP_ENV) or ""
        hang_raw, slow_raw = env.get(HANG_ENV) or "", env.get(SLOW_RANK_ENV) or ""
        if not (trace or fault or sleep or poison_raw or skip_raw or hang_raw or slow_raw):
            return None
        fault_at = _parsed(FAULT_ENV, fault, int, "a step number (an integer)")
        sleep_s = _parsed(SLEEP_ENV, sleep, float, "seconds (a number)") or 0.0
        poison = _parsed(
            POISON_ENV,
            poison_raw,
            lambda v: tuple(_poison(p) for p in v.split(",") if p.strip()),
            "STEP:nan, STEP:spike or STEP:xFACTOR, comma-separated (e.g. 6:nan,9:spike)",
        )
        skip = _parsed(
            SKIP_ENV,
            skip_raw,
            lambda v: tuple(sorted(parse_samples(v))),
            "EPOCH:POSITION or EPOCH:FIRST-LAST, comma-separated (e.g. 0:16-19)",
        )
        hang = _parsed(
            HANG_ENV,
            hang_raw,
            lambda v: _pair(v, int, int, lambda r, s: r >= 0 and s >= 1),
            "RANK:STEP, a rank >= 0 and an optimizer step >= 1 (e.g. 1:12)",
        )
        slow = _parsed(
            SLOW_RANK_ENV,
            slow_raw,
            lambda v: _pair(v, int, float, lambda r, s: r >= 0 and 0 <= s < float("inf")),
            "RANK:SECONDS, a rank >= 0 and seconds >= 0 (e.g. 1:0.3)",
        )
        return cls(
            trace=trace,
            fault_at_step=fault_at,
            step_sleep_s=sleep_s,
            poison=poison or (),
            skip_samples=skip or (),
            hang_at=hang,
            slow_rank=slow,
        )


def _parsed(var: str, raw: Optional[str], parse: Callable[[str], Any], expected: str) -> Any:
    """``parse(raw)`` of environment variable ``var`` (None when unset or empty).

    Raises:
        ConfigError: ``parse`` raised ValueError: names the variable, its value and ``expected``.
    """
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: expected {expected}; unset it") from None


def _pair(text: str, first: Callable[[str], Any], second: Callable[[str], Any], ok: Callable[[Any, Any], bool]) -> Any:
    """``"1:0.3"`` -> ``(first("1"), second("0.3"))``; ValueError unless ``ok`` holds for both."""
    a, _, b = text.partition(":")
    pair = (first(a), second(b))
    if not ok(*pair):
        raise ValueError(text)
    return pair


def parse_samples(text: str) -> Set[Tuple[int, int]]:
    """``"0:16-19,1:4"`` -> ``{(0, 16), ..., (0, 19), (1, 4)}`` (``epoch:position`` or
    ``epoch:first-last``, comma-separated). Raises ValueError on another shape."""
    out: Set[Tuple[int, int]] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        epoch, _, pos = part.partition(":")
        lo, _, hi = pos.partition("-")
        out.update((int(epoch), i) for i in range(int(lo), int(hi or lo) + 1))
    return out


def _poison(item: str) -> Tuple[int, float]:
    """``"6:nan"`` -> ``(6, nan)``; ``"9:spike"`` -> ``(9, 1000.0)``; ``"9:x50"`` -> ``(9, 50.0)``."""
    step, _, kind = item.strip().partition(":")
    kind = kind.strip().lower()
    factor = (
        float("nan") if kind == "nan" else 1000.0 if kind == "spike" else float(kind[1:]) if kind[:1] == "x" else None
    )
    if factor is None:
        raise ValueError(item)
    return int(step), factor


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a Ray Train worker gets from the driver (:func:`megaray.train.launch.fit`).

    Attributes:
        run: the resolved run config as JSON (``RunConfig.model_dump(mode="json")``, paths
            absolute); :meth:`run_config` makes it typed again in the worker.
        info: what the task found on the driver (:class:`~megaray.tasks.base.TaskInfo`: the
            batch plan, validation counts, the manifest); each worker takes its world's
            (:meth:`~megaray.tasks.base.TaskInfo.for_world`).
        run_dir: ``<storage_path>/<name>`` (local path or URI): checkpoints, profile, TensorBoard.
        tracking_uri / mlflow_run_id: the run's MLflow run (None when tracking is off).
        trackers: what rank 0 opens besides MLflow (:func:`megaray.train.trackers.prepare`).
        t0: the driver's wall clock (``time.time()``) when the run started (goodput, startup time).
        console: the rank 0 -> driver progress channel (:mod:`megaray.train.console`); None
            when the driver draws no console (Tune trials, ``--verbose``).
        profile: a profile run: optimizer steps rank 0 records under ``torch.profiler``
            (:mod:`megaray.train.profiler`); None for a normal run.
        debug: the test hooks asked for (:class:`DebugHooks`); None for a normal run.
    """

    run: Dict[str, Any]
    info: TaskInfo
    run_dir: str
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    trackers: Mapping[str, Any] = field(default_factory=dict)
    t0: Optional[float] = None
    console: Optional["Channel"] = None
    profile: Optional[int] = None
    debug: Optional[DebugHooks] = None

    def loop_config(self) -> Dict[str, "WorkerSpec"]:
        """Ray Train's ``train_loop_config`` (a dict): ``{"spec": self}``."""
        return {SPEC_KEY: self}

    @staticmethod
    def of(config: Mapping[str, Any]) -> "WorkerSpec":
        """The spec inside a ``train_loop_config`` made by :meth:`loop_config`.

        Raises:
            TypeError: ``config`` holds no :class:`WorkerSpec` (a trainer built by other code).
        """
        spec = config.get(SPEC_KEY) if isinstance(config, Mapping) else None
        if not isinstance(spec, WorkerSpec):
            raise TypeError(
                f"train_loop_config must be {{{SPEC_KEY!r}: WorkerSpec}} (WorkerSpec.loop_config()), "
                f"got {type(config).__name__} with keys {sorted(config) if isinstance(config, Mapping) else '-'}"
            )
        return spec

    def run_config(self) -> "RunConfig":
        """The typed run config (the family's model config class), validated again."""
        from megaray.families import build_run_config

        return build_run_config(self.run)
