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
    """``loss 6.05 | lr 3.0e-05 | 3,545 tokens/s | MFU 41.0% | data-wait 2%``"""
    parts = [f"loss {m.get('loss', float('nan')):.4f}", f"lr {m.get('lr', 0.0):.1e}"]
    parts.append(f"{m.get('throughput', 0.0):,.0f} {unit}/s")
    if "mfu" in m:
        parts.append(f"MFU {m['mfu'] * 100:.1f}%")
    parts.append(f"data-wait {m.get('data_wait_frac', 0.0) * 100:.0f}%")
    return " | ".join(parts)


def run_with_console(work: Callable[[], Any], channel: Channel, total_steps: int, unit: str,
                     file: Any = None) -> Any:
    """Run ``work()`` (the blocking ``trainer.fit()``) in a thread while drawing rank 0's events;
    returns its result or raises its exception. ``total_steps``: the bar's length
    (``train.max_steps``)."""
    from tqdm import tqdm

    file = file or sys.stdout
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="megaray-fit", daemon=True)
    thread.start()
    bar = tqdm(total=total_steps, desc="train", unit="step", file=file, dynamic_ncols=True,
               mininterval=1.0 if file.isatty() else 30.0, leave=True)

    def show(event: Tuple[str, Any]) -> None:
        kind, payload = event
        if kind == "progress":
            step = int(payload.get("step", bar.n))
            if bar.n == 0 and step > 1:  # a resumed run: the bar starts where the run stands
                bar.n = bar.last_print_n = step
                bar.refresh()
            else:
                bar.set_postfix_str(progress_postfix(payload, unit), refresh=False)
                bar.update(step - bar.n)
        else:
            bar.write(str(payload), file=file)

    try:
        while thread.is_alive():
            event = channel.receive(timeout_s=0.5)
            if event is not None:
                show(event)
        for event in channel.drain():
            show(event)
    finally:
        bar.close()
        channel.close()
    if "error" in box:
        raise box["error"]
    return box["result"]
