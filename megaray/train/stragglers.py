"""Per-rank timing and straggler detection (``train.stragglers``; world size > 1 only).

In synchronous data parallelism every rank's wall time per step is the same: the fast ranks wait
for the slow one inside the step's collectives. So a rank's own slowness must be told apart from
waiting. At one fixed point of every optimizer step (right before its first micro-batch trains)
each rank joins a tiny blocking all-reduce (the *probe*, on a gloo group: host time, no device
sync) and times how long it waited there. The rank the others wait for arrives last and waits
~0; a rank's *busy* time per step is its step time less its probe wait.

Per rank and log window (``train.log_every`` steps), gathered to rank 0 with one all-gather at
each log step and logged as ``rank/<r>/<name>`` at that step:

==================  ==========================================================================
``step_s``          wall seconds per optimizer step (evaluations and checkpoint saves left out)
``data_wait_s``     seconds per step waiting for the next micro-batch of the train stream
``compute_s``       seconds per step in the task's ``train_step`` (forward, backward, optimizer
                    step, and the collectives inside them)
``wait_s``          seconds per step waiting in the probe for the other ranks
``busy_s``          ``step_s - wait_s``: the rank's own pace
==================  ==========================================================================

A rank is *slow* when its busy time is above ``factor`` x the lower median of all ranks' busy
times (for 2 ranks: the other rank's) for ``patience`` log windows in a row. Rank 0 then says so
once (a console line naming the rank, its host and Ray node, and the figures), logs
``stragglers/slow_rank`` (the rank, -1 when none) and ``stragglers/slowdown`` (its busy time /
the median's) at every log step, and says so again when it recovers.

What the probe sees: lateness that builds up between two steps on the host (slow data, slow
host-side work between steps, a sleep, a noisy neighbour). What it does not: a rank slow *inside*
forward/backward (a throttled GPU) reaches the gradient collective late, and the others' wait
lands in their ``compute_s``, not in ``wait_s``; such a rank shows in ``rank/<r>/compute_s`` being
the lowest, not in the warning. Cost: one all-reduce of one number per optimizer step and one
all-gather of five at each log step (none at world size 1).
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megaray.train.extras import Extra

if TYPE_CHECKING:
    from megaray.config import StragglerConfig
    from megaray.train.checkpoint import TrainState
    from megaray.train.mlflow import RunLogger

#: the per-rank figures, in the order they are gathered
FIELDS = ("step_s", "data_wait_s", "compute_s", "wait_s", "busy_s")
#: MLflow metric of rank ``r``'s figure ``name``
RANK_KEY = "rank/{rank}/{name}"


def slow_rank(busy: Sequence[float], factor: float) -> Tuple[Optional[int], float]:
    """``(rank, slowdown)`` of the slowest rank when its busy time is above ``factor`` x the lower
    median of ``busy`` (per-rank seconds per step), else ``(None, slowdown)``. ``slowdown``: the
    slowest rank's busy time / that median (1.0 for no data)."""
    if len(busy) < 2:
        return None, 1.0
    ref = statistics.median_low(busy)
    worst = max(range(len(busy)), key=lambda r: busy[r])
    slowdown = busy[worst] / ref if ref > 0 else float("inf") if busy[worst] > 0 else 1.0
    return (worst if slowdown > factor else None), slowdown


class Detector:
    """The rule over log windows: a rank named slow ``patience`` windows in a row is a straggler
    until a window where it is not (plain Python; unit-tested without Ray)."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.candidate: Optional[int] = None
        self.streak = 0
        self.current: Optional[int] = None  # the rank named, until it recovers

    def window(self, busy: Sequence[float]) -> Tuple[Optional[str], float]:
        """Judge one window; returns ``("named" | "recovered" | None, slowdown)``: what changed."""
        rank, slowdown = slow_rank(busy, self.factor)
        self.streak = self.streak + 1 if rank is not None and rank == self.candidate else int(rank is not None)
        self.candidate = rank
        if self.current is None and rank is not None and self.streak >= self.patience:
            self.current = rank
            return "named", slowdown
        if self.current is not None and rank != self.current:
            self.current = None
            return "recovered", slowdown
        return None, slowdown


class StragglerMonitor(Extra):
    """Per-rank step, data-wait, compute and wait times, and the straggler warning (module
    docstring). Built by every rank of a run with more than one worker; collective at each
    optimizer step (the probe) and at each log step (the gather).

    Args:
        cfg: ``train.stragglers``.
        rank, world: this worker's rank and the world size (> 1).
        due: the reporter's ``due(step)``: the log steps (the same on every rank).
        say: rank 0's console line.
        logger: rank 0's MLflow run (a disabled one elsewhere).
        node_id: this worker's Ray node id (named in the warning).
    """

    def __init__(
        self,
        cfg: "StragglerConfig",
        rank: int,
        world: int,
        due: Callable[[int], bool],
        say: Callable[[str], None],
        logger: "RunLogger",
        node_id: str = "",
    ):
        import torch.distributed as dist

        self.rank, self.world, self.due, self.say, self.logger = rank, world, due, say, logger
        self.detector = Detector(cfg.factor, cfg.patience)
        # the probe and the gather run on gloo (host clocks, no device sync), a group of their own
        # on NCCL runs; every rank creates it (collective)
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        nodes: List[Any] = [None] * world
        dist.all_gather_object(nodes, (socket.gethostname(), node_id), group=self.group)
        self.nodes: List[Tuple[str, str]] = [tuple(n) for n in nodes]
        self._reset()
        self.last: Optional[float] = None  # perf_counter at the end of the last optimizer step
        self.in_step = False
        self.t_batch = 0.0

    def _reset(self) -> None:
        self.sums = dict.fromkeys(FIELDS, 0.0)
        self.steps = 0

    # ---------------------------------------------------------------- loop hooks

    def start(self, state: "TrainState", modules: Mapping[str, torch.nn.Module]) -> None:
        self.first_step = state.step + 1

    def data_wait(self, seconds: float) -> None:
        """The loop's wait for the micro-batch about to train (called before ``before_batch``)."""
        self.sums["data_wait_s"] += seconds

    def exclude(self, seconds: float) -> None:
        """Seconds of this step spent in an evaluation or a checkpoint save (every rank alike):
        left out of ``step_s``, so a window with an evaluation judges the ranks' pace, not it."""
        self.sums["step_s"] -= seconds

    def before_batch(self, batch: Mapping[str, torch.Tensor], state: "TrainState", engines: Mapping[str, Any]) -> None:
        if not self.in_step:  # the first micro-batch of an optimizer step: the probe
            self.in_step = True
            t0 = time.perf_counter()
            torch.distributed.all_reduce(torch.zeros(1), group=self.group)
            self.sums["wait_s"] += time.perf_counter() - t0
        self.t_batch = time.perf_counter()

    def after_batch(self, metrics: Mapping[str, float]) -> None:
        self.sums["compute_s"] += time.perf_counter() - self.t_batch

    def after_step(self, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.sums["step_s"] += now - self.last
            self.steps += 1
        self.last, self.in_step = now, False
        if self.due(step):
            self.gather(step)

    # ---------------------------------------------------------------- log steps

    def gather(self, step: int) -> None:
        """All-gather this window's per-step means; rank 0 logs them and judges the window. Collective."""
        n = max(1, self.steps)
        mine = {k: v / n for k, v in self.sums.items()}
        mine["busy_s"] = mine["step_s"] - mine["wait_s"]
        window_steps = self.steps
        self._reset()
        t = torch.tensor([mine[k] for k in FIELDS], dtype=torch.float64)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t, group=self.group)
        if self.rank != 0 or window_steps == 0:
            return
        rows = [dict(zip(FIELDS, o.tolist())) for o in out]
        metrics: Dict[str, float] = {
            RANK_KEY.format(rank=r, name=k): v for r, row in enumerate(rows) for k, v in row.items()
        }
        busy = [row["busy_s"] for row in rows]
        change, slowdown = self.detector.window(busy)
        metrics["stragglers/slow_rank"] = float(-1 if self.detector.current is None else self.detector.current)
        metrics["stragglers/slowdown"] = slowdown
        self.logger.metrics(metrics, step)
        if change == "named":
            r = self.detector.current
            assert r is not None
            host, node = self.nodes[r]
            ref = statistics.median_low(busy)
            self.say(
                f"straggler: rank {r} (host {host}, node {node[:12] or '?'}) busy {busy[r]:.2f} s/step, "
                f"{slowdown:.1f}x the median rank's {ref:.2f} s over the last {self.detector.patience} log windows "
                f"(steps to {step}): it sets the pace of every step (rank/{r}/* in MLflow: data wait "
                f"{rows[r]['data_wait_s']:.2f} s/step, compute {rows[r]['compute_s']:.2f} s/step)"
            )
        elif change == "recovered":
            self.say(f"straggler: the slow rank keeps pace again at step {step} (slowdown {slowdown:.1f}x)")
