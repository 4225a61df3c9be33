"""Where a run's start-up goes: wall-clock marks from process start to the first trained step.

Start-up is paid again by every restart of the worker group (a crash, an elastic resize), so it is
measured in parts (``benchmarks/goodput.py``, issue #22): ``time.time()`` at the end of each
phase, by name. The driver's are kept by :func:`megaray.train.launch.fit` for its run (``fit``,
``checks``, ``ray``, ``datasets``, ``mlflow``, ``trainer``); a worker process's here, in
:data:`MARKS` (the first of each name kept; :mod:`megaray.train.loop`: ``loop`` when the
training function starts, then ``config``, ``locate``, ``task``, ``stream``, ``modules``,
``engines``, ``restore``, ``ready``, and ``first_batch`` when the train stream's first
micro-batch arrives, from the prefetch thread). Marking costs a dict write; the
marks are written out only by the trace test hook (``MEGARAY_TRACE``: the driver's in
``<path>.driver``, a worker's in its ``<path>.starts.rank<r>`` line,
:class:`megaray.train.extras.Trace`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict

#: this process's marks: phase name -> ``time.time()`` when it ended
MARKS: Dict[str, float] = {}


def mark(name: str) -> None:
    """Record that phase ``name`` ended now (the first mark of a name is kept)."""
    MARKS.setdefault(name, time.time())


def process_start() -> float:
    """``time.time()`` when this process was created (psutil, a Ray dependency; 0.0 when unknown)."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # noqa: BLE001 - a missing figure, not a failure
        return 0.0


def marks() -> Dict[str, float]:
    """This process's marks, with ``process`` (its creation time) first."""
    return {"process": process_start(), **MARKS}


def write_line(path: str, record: Dict[str, object]) -> None:
    """Append ``record`` as one JSON line to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
