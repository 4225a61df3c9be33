"""The console of a run: one progress bar, a line per evaluation and the final summary.

Rank 0's :class:`~megaray.train.reporter.Reporter` sends events through a :class:`Channel` (a
``ray.util.queue.Queue`` actor: a few small messages per logged step) to the driver, where
:func:`run_with_console` draws a tqdm bar (step, loss, lr, throughput, MFU, data wait, ETA) and
prints the other lines above it. Everything else the workers, Ray's controller and the
libraries print (per-report dicts, worker-group chatter, deprecation warnings, Ray Data plans)
stays in Ray's session logs (``/tmp/ray/session_latest/logs``): the driver connects with
``log_to_driver=False``. ``--verbose`` (``MEGARAY_VERBOSE=1``) brings all of it back, and then
the workers print their own lines as before.

Ray Tune searches do not use this console: their console is Tune's trial table.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

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

    def progress(self, m: Dict[str, Any]) -> None:
        print(f"step {int(m['step'])}/{self.total} | {progress_postfix(m, self.unit)}", file=self.file, flush=True)

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
        self.bar = tqdm(total=total, desc="train", unit="step", file=file, dynamic_ncols=True,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} | {postfix}")

    def progress(self, m: Dict[str, Any]) -> None:
        self.bar.set_postfix_str(progress_postfix(m, self.unit), refresh=False)
        self.bar.update(int(m["step"]) - self.bar.n)

    def line(self, text: str) -> None:
        self.bar.write(text, file=self.file)

    def close(self) -> None:
        self.bar.close()


def run_with_console(work: Callable[[], Any], channel: Channel, total_steps: int, unit: str,
                     file: Any = None) -> Any:
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
