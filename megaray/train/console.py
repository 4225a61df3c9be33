"""The console of a run: one progress bar, a line per evaluation and the final summary.

Rank 0's :class:`~megaray.train.reporter.Reporter` sends events through a :class:`Channel` (a
``ray.util.queue.Queue`` actor: a few small messages per logged step) to the driver, where
:func:`run_with_console` draws a tqdm bar (step, loss, lr, throughput, MFU, data wait, ETA) and
prints the other lines above it. Everything else the workers, Ray's controller and the
libraries print (per-report dicts, worker-group chatter, deprecation warnings, Ray Data plans)
stays in Ray's session logs (``/tmp/ray/session_latest/logs``): the driver connects with
``log_to_driver=False``. ``--verbose`` (``MEGARAY_VERBOSE=1``) brings all of it back, and then
the workers print their own lines as before.

Every run keeps its console in ``<run folder>/log.txt`` (:func:`keep_console`): what this process
prints while the run is driven from it, appended across restarts after a line naming the restart
time and command.

Ray Tune searches do not use this console: their console is Tune's trial table.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

#: the environment switch of ``--verbose``
VERBOSE_ENV = "MEGARAY_VERBOSE"


def verbose() -> bool:
    """True when ``--verbose`` / ``MEGARAY_VERBOSE=1`` asked for every library's output."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_driver() -> None:
    """Driver side: library warnings and INFO chatter off (unless verbose); megaray's INFO stays."""
    if verbose():
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is deprecated.*")
    for name in ("ray", "mlflow", "alembic", "urllib3", "deepspeed", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow sets its own loggers to INFO when first imported (later than this call) unless told
    # otherwise, and draws a progress bar for every artifact download (logging the final model)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a local cluster's "Token authentication is enabled" notice: the token is Ray's default, not
    # something the user chose or must act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


class Channel:
    """Rank 0 -> driver messages. ``kind`` is ``"progress"`` (a metrics dict with ``step``) or
    ``"line"`` (text). Sending never blocks training: a full queue drops progress events."""

    def __init__(self, maxsize: int = 1000):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0})

    def send(self, kind: str, payload: Any) -> None:
        from ray.util.queue import Full

        try:
            self.queue.put_nowait((kind, payload))
        except Full:
            pass

    def receive(self, timeout_s: float) -> Optional[Tuple[str, Any]]:
        from ray.util.queue import Empty

        try:
            return self.queue.get(timeout=timeout_s)
        except Empty:
            return None

    def drain(self) -> list:
        from ray.util.queue import Empty

        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except Empty:
                return out

    def close(self) -> None:
        self.queue.shutdown(force=True)


def progress_postfix(m: Dict[str, float], unit: str) -> str:
    """``loss 6.0507 | lr 3.0e-05 | 3,545 tokens/s | MFU 41.0% | data-wait 2% | ETA 0m11s``"""
    from megaray.train.reporter import fmt_s

    parts = [f"loss {m.get('loss', float('nan')):.4f}", f"lr {m.get('lr', 0.0):.1e}"]
    if "grad_norm" in m:
        parts.append(f"gnorm {m['grad_norm']:.2f}")
    parts.append(f"{m.get('throughput', 0.0):,.0f} {unit}/s")
    if "mfu" in m:
        parts.append(f"MFU {m['mfu'] * 100:.1f}%")
    parts.append(f"data-wait {m.get('data_wait_frac', 0.0) * 100:.0f}%")
    if "eta_s" in m:
        parts.append(f"ETA {fmt_s(m['eta_s'])}")
    return " | ".join(parts)


class _Lines:
    """Display for a file that is not a terminal (CI logs, ``ray job logs``): one line per event."""

    def __init__(self, total: int, unit: str, file: Any):
        self.total, self.unit, self.file = total, unit, file

    def text(self, m: Dict[str, Any]) -> str:
        return f"step {int(m['step'])}/{self.total} | {progress_postfix(m, self.unit)}"

    def progress(self, m: Dict[str, Any]) -> None:
        print(self.text(m), file=self.file, flush=True)

    def line(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        pass


class _Bar(_Lines):
    """Display for a terminal: one tqdm bar (its postfix carries rank 0's ETA, which leaves out
    the start-up), lines printed above it."""

    def __init__(self, total: int, unit: str, file: Any):
        from tqdm import tqdm

        super().__init__(total, unit, file)
        self.bar = tqdm(
            total=total,
            desc="train",
            unit="step",
            file=file,
            dynamic_ncols=True,
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} | {postfix}",
        )

    def progress(self, m: Dict[str, Any]) -> None:
        self.bar.set_postfix_str(progress_postfix(m, self.unit), refresh=False)
        self.bar.update(int(m["step"]) - self.bar.n)
        if isinstance(self.file, _Tee):  # the bar's states, one line each, in log.txt only
            self.file.log.line(self.text(m))

    def line(self, text: str) -> None:
        self.bar.write(text, file=self.file)

    def close(self) -> None:
        self.bar.close()


def run_with_console(work: Callable[[], Any], channel: Channel, total_steps: int, unit: str, file: Any = None) -> Any:
    """Run ``work()`` (the blocking ``trainer.fit()``) in a thread while showing rank 0's events
    on ``file`` (stdout): a tqdm bar on a terminal, plain lines otherwise. Returns ``work()``'s
    result or raises its exception. ``total_steps``: ``train.max_steps``."""
    file = file or sys.stdout
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="megaray-fit", daemon=True)
    thread.start()
    display = (_Bar if file.isatty() else _Lines)(total_steps, unit, file)

    def show(event: Tuple[str, Any]) -> None:
        kind, payload = event
        display.progress(payload) if kind == "progress" else display.line(str(payload))

    try:
        while thread.is_alive():
            event = channel.receive(timeout_s=0.5)
            if event is not None:
                show(event)
        for event in channel.drain():
            show(event)
    finally:
        display.close()
        channel.close()
    if "error" in box:
        raise box["error"]
    return box["result"]


#: the run's console file, in its run folder
LOG_FILE = "log.txt"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ConsoleLog:
    """``<run_dir>/log.txt``, appended to: a separator line (local time, ``start`` or ``restart``,
    the command), then each line as a terminal finally shows it (the text after its last carriage
    return, colours removed: of a redrawn tqdm bar, its last state). Written and flushed line by
    line. With a remote ``run_dir`` (``s3://``) the lines go to a local temporary file and
    :meth:`close` writes the old log plus them to ``<run_dir>/log.txt``."""

    def __init__(self, run_dir: str):
        import tempfile

        from megaray import fs
        from megaray.train.mlflow import command_line

        self.run_dir = run_dir
        self.target = self.target_of(run_dir)
        self.remote = fs.is_uri(run_dir)
        self.new_folder = False
        existed = fs.exists(self.target)
        if self.remote:
            self.before = fs.read_text(self.target) if existed else ""
            fd, self.path = tempfile.mkstemp(prefix="megaray-log-", suffix=".txt")
            os.close(fd)
        else:
            self.new_folder = not os.path.isdir(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            self.path = self.target
        self.file = open(self.path, "a", encoding="utf-8")
        self.closed = False  # then writes are dropped (a handler Ray made meanwhile may still hold a _Tee)
        self.lock = threading.Lock()
        self.pending: Dict[int, str] = {}  # stream id -> its unfinished line
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.line(f"===== {stamp} {'restart' if existed else 'start'}: {command_line()} =====")

    @staticmethod
    def target_of(run_dir: str) -> str:
        """``<run_dir>/log.txt``."""
        from megaray import fs

        return fs.join(run_dir, LOG_FILE)

    def line(self, text: str) -> None:
        with self.lock:
            if self.closed:
                return
            self.file.write(text + "\n")
            self.file.flush()

    def feed(self, stream: int, text: str) -> None:
        """Text written to stream ``stream`` (an id): its complete lines go to the file."""
        with self.lock:
            if self.closed:
                return
            *lines, self.pending[stream] = (self.pending.get(stream, "") + text).split("\n")
            for line in lines:
                self._write(line)
            if lines:
                self.file.flush()

    def _write(self, line: str) -> None:
        shown = _ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip()
        if shown or "\r" not in line:  # a line a bar cleared leaves nothing
            self.file.write(shown + "\n")

    def close(self, keep: bool = True) -> None:
        """Finish the file. ``keep=False`` (a run refused before it started): a run folder this log
        created and that holds nothing else is removed again, and a remote log whose folder does not
        exist is not written, so
        a refused run leaves no trace but its console. A folder with anything else in it (checkpoints)
        keeps its log."""
        with self.lock:
            for rest in self.pending.values():
                if rest.rsplit("\r", 1)[-1].strip():
                    self._write(rest)
            self.pending.clear()
            self.file.close()
            self.closed = True
        if not keep:
            from megaray import fs

            if self.remote and not self.before and not fs.exists(self.run_dir):
                os.unlink(self.path)  # a remote run folder that does not exist yet: nothing to add a log to
                return
            if not self.remote and self.new_folder and os.listdir(self.run_dir) == [LOG_FILE]:
                import shutil

                shutil.rmtree(self.run_dir, ignore_errors=True)
                return
        if self.remote:
            import pyarrow.fs as pafs

            from megaray import fs

            try:
                filesystem, folder = fs.resolve(fs.dirname(self.target))
                if isinstance(filesystem, pafs.LocalFileSystem):  # file:// before Ray made the run folder
                    filesystem.create_dir(folder, recursive=True)
                with open(self.path, encoding="utf-8") as f:
                    fs.write_text(self.target, self.before + f.read())
            except (OSError, ValueError) as e:  # the run's own result matters more than its log's upload
                logging.getLogger("megaray.train").warning(
                    "could not write %s (%s); the log is in %s", self.target, e, self.path
                )
                return
            os.unlink(self.path)


class _Tee:
    """``sys.stdout`` / ``sys.stderr`` while a run keeps its console: writes go to the stream and to
    the :class:`ConsoleLog`; everything else (``isatty``, ``fileno``, ``encoding``) is the stream's."""

    def __init__(self, stream: Any, log: ConsoleLog):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        self.log.feed(id(self), text)
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def keep_console(run_dir: Optional[str]) -> Iterator[Optional[ConsoleLog]]:
    """Append what this process prints meanwhile (``sys.stdout``, ``sys.stderr`` and the logging
    handlers that write to them) to ``<run_dir>/log.txt`` too (:class:`ConsoleLog`), and the error
    that ends the block, if one does. ``None``, or inside another ``keep_console`` of the same run:
    nothing more. Yields the log (or None)."""
    if run_dir is None or (isinstance(sys.stdout, _Tee) and sys.stdout.log.target == ConsoleLog.target_of(run_dir)):
        yield None
        return
    log = ConsoleLog(run_dir)
    out, err = sys.stdout, sys.stderr
    tees = {id(out): _Tee(out, log), id(err): _Tee(err, log)}
    swapped = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler and id(h.stream) in tees:
                swapped.append((h, h.stream))
                h.setStream(tees[id(h.stream)])
    sys.stdout, sys.stderr = tees[id(out)], tees[id(err)]
    keep = True
    try:
        yield log
    except BaseException as e:  # why the run ended (the CLI prints it after this block)
        from megaray.errors import MegarayError

        log.line(f"error: {e}" if isinstance(e, MegarayError) else f"{type(e).__name__}: {e}")
        keep = not isinstance(e, MegarayError)  # bad config or data: refused before anything ran
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        for h, stream in swapped:
            h.setStream(stream)
        log.close(keep=keep)
