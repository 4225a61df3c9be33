"""The hang watchdog (``train.watchdog``): a rank stuck in one phase of the loop dumps its stacks and fails.

A rank can hang where no error is ever raised: a stalled ``streaming_split`` read (ray issue
#42008), a collective whose peer is gone, a deadlocked data or checkpoint thread. The whole worker
group then stalls until someone notices. The :class:`Watchdog` is a daemon thread in every worker
that the loop tells which *phase* it is in (:meth:`Watchdog.arm`):

=============  ==============================================================================
``startup``    worker start to the end of the first optimizer step (build, restore, first data)
``step``       from the end of one optimizer step to the end of the next (data wait, the
               guard's check and progress reports included; evaluation and checkpoints are
               their own phases); named by the step in progress
``eval``       an evaluation
``checkpoint`` a checkpoint save, or the guard's in-process restore of one
=============  ==============================================================================

``startup`` has a fixed timeout (``startup_timeout_s``). The others time out after ``factor`` x
the median of that phase's last :data:`WINDOW` durations in this worker, never below the phase's
floor (``step_timeout_s``, ``eval_timeout_s``, ``checkpoint_timeout_s``; the floor alone until
:data:`MIN_SAMPLES` durations exist): a run whose steps take 0.3 s is caught after the floor, one
whose steps take minutes is not killed for one slow step.

A rank past its timeout writes a header line (rank, host, pid, phase, step, elapsed, timeout and
the key to raise) and every thread's Python stack (``faulthandler.dump_traceback``) to
``<run_dir>/watchdog/rank<r>-pid<pid>.txt`` and to stderr (Ray's session logs, and the driver's
console under ``--verbose``), sends the header line to the driver's console (``log.txt``), then
kills its own process (SIGKILL). The training function runs in a thread of the Ray actor and may be
blocked inside a C call (a collective, a queue read), where no exception would reach it: the
process dies instead, Ray Train's controller sees a dead worker, tears the group down and restarts
it from the last reported checkpoint (``scaling.max_failures``; when they are used up the run fails
with the dead worker's error), exactly as after any other worker failure. The next group's rank 0
logs the dumps to the MLflow run (``watchdog/``, :func:`log_dumps`). With an ``s3://`` / ``gs://``
run folder the dump is written to the worker's temp folder and copied there (a failed copy is
reported on stderr; the stacks are on stderr either way).

Once the training thread has ended (the loop raised: Ray Train handles that failure) the watchdog
stands down without a dump.

Cost on the hot path: :meth:`Watchdog.arm` reads ``time.monotonic()``, appends the phase's
duration, takes an uncontended lock and stores a deadline; it wakes the thread only when the new
deadline is earlier than the one it sleeps towards (a phase change to a shorter timeout), otherwise
the thread wakes at the old deadline, sees the later one and sleeps again.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional

if TYPE_CHECKING:
    from megaray.config import WatchdogConfig
    from megaray.train.mlflow import RunLogger

#: the loop's phases, in the order a run meets them
PHASES = ("startup", "step", "eval", "checkpoint")
#: durations of a phase before its timeout follows their median (the floor alone before)
MIN_SAMPLES = 5
#: durations of a phase the median looks back on
WINDOW = 100
#: the folder under the run directory that holds the dumps (and the MLflow artifact folder)
FOLDER = "watchdog"
#: seconds the console line may take to reach the driver before the worker stops anyway
TELL_TIMEOUT_S = 5.0


def kill_self(path: str) -> None:
    """The default action past a timeout: SIGKILL this worker process (Ray Train restarts the group)."""
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def console_teller(channel: Any) -> Optional[Callable[[str], None]]:
    """A function sending a line to the driver's console through ``channel``
    (:class:`megaray.train.console.Channel`, the run's; None: no console), waiting at most
    :data:`TELL_TIMEOUT_S` (a Ray actor call from a worker about to stop)."""
    if channel is None:
        return None

    def tell(line: str) -> None:
        sender = threading.Thread(target=channel.send, args=("line", line), name="megaray-watchdog-tell", daemon=True)
        sender.start()
        sender.join(TELL_TIMEOUT_S)

    return tell


class Watchdog:
    """Per-phase timeouts of one worker (module docstring).

    Args:
        cfg: ``train.watchdog``.
        rank: this worker's world rank (named in the dump).
        run_dir: the run's folder (local path or URI); the dump goes to ``<run_dir>/watchdog/``.
        on_timeout: called with the dump's path once it is written; default :func:`kill_self`
            (tests pass their own).
        tell: sends the one-line verdict to the driver's console (:func:`console_teller`); None: stderr only.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        cfg: "WatchdogConfig",
        rank: int,
        run_dir: str,
        on_timeout: Callable[[str], None] = kill_self,
        tell: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.rank, self.run_dir = cfg, rank, run_dir
        self.on_timeout, self.tell, self.clock = on_timeout, tell, clock
        self.floors: Dict[str, float] = {
            "startup": cfg.startup_timeout_s,
            "step": cfg.step_timeout_s,
            "eval": cfg.eval_timeout_s,
            "checkpoint": cfg.checkpoint_timeout_s,
        }
        self.durations: Dict[str, Deque[float]] = {p: deque(maxlen=WINDOW) for p in PHASES}
        self.phase: Optional[str] = None
        self.step = 0
        self.started = 0.0
        self.deadline = float("inf")
        self.fired: Optional[str] = None  # the dump's path, once fired
        self._sleeping_until = float("inf")  # the deadline the thread waits for
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._owner: Optional[threading.Thread] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ the loop's side

    def start(self) -> "Watchdog":
        """Enter the ``startup`` phase and start the thread; the calling thread is the one watched
        (the training thread: once it has ended, nothing fires)."""
        self._owner = threading.current_thread()
        self.arm("startup", 0)
        self._thread = threading.Thread(target=self._watch, name="megaray-watchdog", daemon=True)
        self._thread.start()
        return self

    def timeout(self, phase: str) -> float:
        """Seconds ``phase`` may take now: ``startup``: its fixed timeout; the others: max(floor,
        ``factor`` x the median of its last :data:`WINDOW` durations) once :data:`MIN_SAMPLES`
        exist, else the floor."""
        floor = self.floors[phase]
        seen = self.durations[phase]
        if phase == "startup" or len(seen) < MIN_SAMPLES:
            return floor
        return max(floor, self.cfg.factor * statistics.median(seen))

    def arm(self, phase: str, step: int) -> None:
        """Enter ``phase`` (one of :data:`PHASES`) at ``step`` (for ``step``: the optimizer step in
        progress; else the step just done); the phase left behind adds its duration to its median
        (``startup`` aside)."""
        now = self.clock()
        with self._lock:
            if self.phase is not None and self.phase != "startup":
                self.durations[self.phase].append(now - self.started)
            self.phase, self.step, self.started = phase, step, now
            self.deadline = deadline = now + self.timeout(phase)
            wake = deadline < self._sleeping_until
        if wake:
            self._wake.set()

    def stop(self) -> None:
        """The loop ended: no phase is watched any more; the thread exits."""
        with self._lock:
            self.phase, self.deadline, self._stop = None, float("inf"), True
        self._wake.set()

    # ------------------------------------------------------------------ the thread

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                now = self.clock()
                due = self.phase is not None and now >= self.deadline
                if due:
                    assert self.phase is not None
                    phase, step = self.phase, self.step
                    elapsed, timeout = now - self.started, self.deadline - self.started
                    self.phase, self.deadline = None, float("inf")
                self._sleeping_until = self.deadline
                left = self.deadline - now
            if due:
                if self._owner is not None and not self._owner.is_alive():
                    return  # the loop raised: Ray Train handles that failure; nothing hangs
                self.fire(phase, step, elapsed, timeout)
                return
            self._wake.wait(timeout=min(left, 3600.0))
            self._wake.clear()

    def describe(self, phase: str, step: int, elapsed: float, timeout: float) -> str:
        """The one-line verdict (the dump's header and the console line); ``{path}`` stands for the dump's path."""
        seen = list(self.durations[phase])
        if phase == "startup":
            why = f"train.watchdog.startup_timeout_s={self.cfg.startup_timeout_s:g}"
        elif len(seen) < MIN_SAMPLES:
            why = f"train.watchdog.{phase}_timeout_s={self.floors[phase]:g}; {len(seen)} {phase}(s) measured"
        else:
            why = (
                f"max(train.watchdog.{phase}_timeout_s={self.floors[phase]:g}, "
                f"{self.cfg.factor:g} x median {statistics.median(seen):.2f}s)"
            )
        where = {"startup": "start-up", "step": f"step {step}"}.get(phase, f"{phase} at step {step}")
        return (
            f"watchdog: rank {self.rank} ({socket.gethostname()}, pid {os.getpid()}) stuck in {where} for "
            f"{elapsed:.1f}s (timeout {timeout:.1f}s = {why}); stacks in {{path}}; this worker stops and "
            "Ray Train restarts the group from the last checkpoint (raise the timeout if the phase is just slow)"
        )

    def fire(self, phase: str, step: int, elapsed: float, timeout: float) -> None:
        """Write the dump (header + every thread's stack) to the run folder and stderr, tell the
        driver's console, then act (``on_timeout``)."""
        from megaray import fs

        name = f"rank{self.rank}-pid{os.getpid()}.txt"
        remote = fs.is_uri(self.run_dir)
        folder = os.path.join(tempfile.gettempdir(), "megaray-watchdog") if remote else fs.join(self.run_dir, FOLDER)
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, name)
        path = fs.join(self.run_dir, FOLDER, name) if remote else local
        line = self.describe(phase, step, elapsed, timeout).replace("{path}", path)
        with open(local, "w") as f:
            f.write(line + "\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        with open(local) as f:
            text = f.read()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        if remote:
            try:
                fs.write_text(path, text)
            except Exception as e:  # the dump is in the worker's stderr either way
                sys.stderr.write(f"watchdog: could not copy {local} to {path}: {e}\n")
        if self.tell is not None:
            try:
                self.tell(line)
            except Exception as e:  # the console is a convenience; the dump is written
                sys.stderr.write(f"watchdog: could not reach the driver's console: {e}\n")
        self.fired = path
        self.on_timeout(path)


def log_dumps(logger: "RunLogger", run_dir: str) -> int:
    """Rank 0 of a (re)started group: log the dumps earlier groups of this run left under
    ``<run_dir>/watchdog/`` (a local folder or a URI) as the MLflow run's ``watchdog/<file>``
    artifacts. Returns how many files were logged (0 with tracking off or none there)."""
    import pyarrow.fs as pafs

    from megaray import fs

    if not logger.enabled:
        return 0
    filesystem, folder = fs.resolve(fs.join(run_dir, FOLDER))
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".txt"))
    for name in names:
        logger.text(fs.read_text(fs.join(run_dir, FOLDER, name)), f"{FOLDER}/{name}")
    return len(names)
