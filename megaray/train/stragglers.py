"""Per-rank timing and straggler detection (``train.stragglers``; world size > 1 only).

In synchronous data parallelism every rank's wall time per step is the same: the fast ranks wait
for the slow one inside the step's collectives. So a rank's own slowness must be told apart from
waiting, by two measurements:

* **The probe**, for slowness between steps. At one fixed point of every optimizer step (right
  before its first micro-batch trains, after it was fetched) each rank joins a tiny blocking
  all-reduce (on a gloo group: host time, no device sync) and times how long it waited there. The
  rank the others wait for arrives last and waits ~0 (its lateness, ``max_j wait_j - wait_r``, is
  the largest: :func:`lateness`); a rank's *busy* time per step is its step time less its probe
  wait (:func:`window_figures`).
* **The forward timer**, for slowness inside the step. Every rank enters ``train_step`` at the
  probe's release and leaves the gradient collective with the others, so host clocks around the
  step see the same time on every rank. The model's forward pass (in training mode) has no
  collective at ZeRO stages 0-2, so its duration is the rank's own compute: timed with CUDA events
  on a GPU (device time; the events are read at the log step, no sync on the hot path) and the
  host clock on CPU (:class:`ForwardTimer`; not under ``train.compile``).

Per rank and log window (``train.log_every`` steps), gathered to rank 0 with one all-gather at
each log step and logged as ``system/rank/<r>/<name>`` at that step (under ``system/``, so that a
run's page shows them in MLflow's System metrics tab, not above the model's charts):

==================  ==========================================================================
``step_s``          seconds per optimizer step, the loop's bookkeeping left out (progress
                    reports, evaluations, checkpoint saves, a guard's rollback: the same work
                    on every rank, or rank 0's logging)
``data_wait_s``     seconds per step waiting for the train stream's next micro-batch
``compute_s``       seconds per step in the task's ``train_step`` (forward, backward, optimizer
                    step, and the collectives inside them: the same on every rank)
``forward_s``       seconds per step in the model's forward passes (the forward timer; 0 when
                    not timed)
``wait_s``          seconds per step waiting in the probe for the other ranks
``busy_s``          ``step_s - wait_s``: the rank's own pace
==================  ==========================================================================

The first step after a (re)start is left out of the figures (start-up skew, not pace). A rank is
*slow* when its busy time, or else its forward time, is above ``factor`` x the lower median of
all ranks' (for 2 ranks: the other rank's) and at least :data:`NOISE_S` above it, for
``patience`` log windows in a row (:class:`Detector`). Rank 0 then says so once (a console line
naming the rank, its host, IP and node, and the figures), logs ``system/stragglers/slow_rank``
(the rank, -1 when none) and ``system/stragglers/slowdown`` (the slowest rank's busy or forward
time / the median's, the larger) at every log step, and says so again when it recovers.

What it sees: lateness that builds up on a rank's host between two probes (slow data, slow
host-side work between steps, a sleep, a noisy neighbour) and, at ZeRO 0-2, a slow forward pass
(a throttled or shared GPU, a slow CPU). What it does not: a rank slow only in its backward pass
or optimizer step (they contain the gradient collectives: everyone leaves them together); at
ZeRO-3 the forward pass all-gathers parameters layer by layer, so every rank's forward time
includes waiting for the slow one and it names no one. Cost: one all-reduce of one number per
optimizer step, two CUDA events (or clock reads) per forward pass, and one all-gather of seven
numbers per log step (none at world size 1).
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
FIELDS = ("step_s", "data_wait_s", "compute_s", "forward_s", "wait_s", "busy_s")
#: the figures a rank is judged by, in order: the first that names a rank names it
MEASURES = ("busy_s", "forward_s")
#: seconds per step a rank must be above the median rank to be named (timer noise)
NOISE_S = 0.002
#: MLflow metric of rank ``r``'s figure ``name``
RANK_KEY = "system/rank/{rank}/{name}"
#: MLflow metrics of the verdict at each log step: the rank named slow (-1: none), its slowdown
SLOW_RANK_KEY, SLOWDOWN_KEY = "system/stragglers/slow_rank", "system/stragglers/slowdown"


def window_figures(sums: Mapping[str, float], steps: int) -> Dict[str, float]:
    """One rank's figures of a window: ``sums`` (seconds summed over the window's ``steps``
    optimizer steps: ``step_s``, ``data_wait_s``, ``compute_s``, ``forward_s``, ``wait_s``) as
    seconds per step, with ``busy_s = step_s - wait_s`` (the step less its wait for the other ranks)."""
    n = max(1, steps)
    out = {k: sums.get(k, 0.0) / n for k in FIELDS if k != "busy_s"}
    out["busy_s"] = out["step_s"] - out["wait_s"]
    return out


def lateness(waits: Sequence[float]) -> List[float]:
    """Each rank's lateness at one probe (seconds): how long after the first rank it arrived,
    ``max_j wait_j - wait_r``, from the waits alone (no shared clock needed)."""
    top = max(waits, default=0.0)
    return [top - w for w in waits]


def slow_rank(values: Sequence[float], factor: float) -> Tuple[Optional[int], float]:
    """``(rank, slowdown)`` of the slowest rank when its value (seconds per step) is above
    ``factor`` x the lower median of ``values`` and at least :data:`NOISE_S` above it, else
    ``(None, slowdown)``. ``slowdown``: the slowest rank's value / that median (1.0 for no data)."""
    if len(values) < 2:
        return None, 1.0
    ref = statistics.median_low(values)
    worst = max(range(len(values)), key=lambda r: values[r])
    top = values[worst]
    slowdown = top / ref if ref > 0 else float("inf") if top > NOISE_S else 1.0
    return (worst if slowdown > factor and top - ref >= NOISE_S else None), slowdown


class Detector:
    """The rule over log windows: a rank named slow (by :data:`MEASURES`, in order) ``patience``
    windows in a row is a straggler until a window where it is not (plain Python; unit-tested
    without Ray)."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.candidate: Optional[int] = None
        self.streak = 0
        self.current: Optional[int] = None  # the rank named, until it recovers
        self.measure = MEASURES[0]  # the figure that named it

    def window(self, busy: Sequence[float], forward: Sequence[float] = ()) -> Tuple[Optional[str], float]:
        """Judge one window (per rank: busy and forward seconds per step); returns
        ``("named" | "recovered" | None, slowdown)``: what changed, and the larger slowdown."""
        verdicts = [(m, *slow_rank(v, self.factor)) for m, v in zip(MEASURES, (busy, forward)) if len(v)]
        slowdown = max(d for _, _, d in verdicts)
        measure, rank, _ = next((v for v in verdicts if v[1] is not None), (None, None, 0.0))
        self.streak = self.streak + 1 if rank is not None and rank == self.candidate else int(rank is not None)
        self.candidate = rank
        if self.current is None and rank is not None and self.streak >= self.patience:
            self.current, self.measure = rank, measure
            return "named", slowdown
        if self.current is not None and rank != self.current:
            self.current = None
            return "recovered", slowdown
        return None, slowdown


class ForwardTimer:
    """Seconds this rank spends in ``module``'s forward passes in training mode (evaluation's are
    left out), from forward hooks: CUDA events on a GPU (device time, read by :meth:`take`, which
    waits for the last one), the host clock otherwise."""

    def __init__(self, module: torch.nn.Module):
        param = next(module.parameters(), None)
        self.cuda = param is not None and param.device.type == "cuda"
        self.device = param.device if param is not None else None
        self.module = module
        self.pairs: List[Tuple[Any, Any]] = []  # (start, end) CUDA events since the last take
        self.host = 0.0
        self._open: Any = None
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training:
            return
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record(torch.cuda.current_stream(self.device))
        else:
            self._open = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        if not module.training or self._open is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self.pairs.append((self._open, end))
        else:
            self.host += time.perf_counter() - self._open
        self._open = None

    def take(self) -> float:
        """Forward seconds since the last call (on a GPU: waits for the last forward's end event)."""
        if self.cuda:
            if self.pairs:
                self.pairs[-1][1].synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0
            self.pairs.clear()
            return total
        total, self.host = self.host, 0.0
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StragglerMonitor(Extra):
    """Per-rank step, data-wait, compute, forward and wait times, and the straggler warning
    (module docstring). Built by every rank of a run with more than one worker (:meth:`joined`);
    collective at each optimizer step (the probe) and at each log step (the gather).

    Args:
        cfg: ``train.stragglers``.
        rank, world: this worker's rank and the world size (> 1).
        due: the reporter's ``due(step)``: the log steps (the same on every rank).
        say: rank 0's console line.
        logger: rank 0's MLflow run (a disabled one elsewhere).
        nodes: per rank, ``(host, ip, node)``: its host name, IP and node name (named in the warning).
        group: the process group of the probe and the gather (None: the default group, gloo).
    """

    def __init__(
        self,
        cfg: "StragglerConfig",
        rank: int,
        world: int,
        due: Callable[[int], bool],
        say: Callable[[str], None],
        logger: "RunLogger",
        nodes: Sequence[Tuple[str, str, str]],
        group: Any = None,
    ):
        self.rank, self.world, self.due, self.say, self.logger = rank, world, due, say, logger
        self.nodes, self.group = list(nodes), group
        self.detector = Detector(cfg.factor, cfg.patience)
        self.timer: Optional[ForwardTimer] = None
        self._reset()
        self.last: Optional[float] = None  # perf_counter at the end of the last optimizer step
        self.in_step = False
        self.t_batch = 0.0

    @classmethod
    def joined(
        cls,
        cfg: "StragglerConfig",
        rank: int,
        world: int,
        due: Callable[[int], bool],
        say: Callable[[str], None],
        logger: "RunLogger",
        node: str,
    ) -> "StragglerMonitor":
        """The monitor of this rank (``node``: its node's name, as its system metrics are keyed):
        every rank creates the probe's gloo group (on NCCL runs) and all-gathers its host name,
        IP and node name once. Collective."""
        import torch.distributed as dist

        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        try:
            from ray.util import get_node_ip_address

            ip = get_node_ip_address()
        except Exception:  # outside a Ray worker
            ip = "?"
        nodes: List[Any] = [None] * world
        dist.all_gather_object(nodes, (socket.gethostname(), ip, node), group=group)
        return cls(cfg, rank, world, due, say, logger, [tuple(n) for n in nodes], group)

    def _reset(self) -> None:
        self.sums = dict.fromkeys(FIELDS[:-1], 0.0)
        self.steps = 0

    # ---------------------------------------------------------------- loop hooks

    def start(self, state: "TrainState", modules: Mapping[str, torch.nn.Module]) -> None:
        model = modules.get("model")
        # not under train.compile: a hook with a clock would break the compiled graph
        if model is not None and getattr(model, "_compiled_call_impl", None) is None:
            self.timer = ForwardTimer(model)

    def data_wait(self, seconds: float) -> None:
        """The loop's wait for the micro-batch about to train (called before ``before_batch``)."""
        self.sums["data_wait_s"] += seconds

    def exclude(self, seconds: float) -> None:
        """Seconds of this step spent in the loop's bookkeeping (progress reports, evaluation,
        checkpoint save, rollback): left out of ``step_s``, so the figures judge the ranks' pace."""
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
        if self.last is None:  # the first step after a (re)start: start-up skew, not pace
            self._reset()
            if self.timer is not None:
                self.timer.take()
        else:
            self.sums["step_s"] += now - self.last
            self.steps += 1
        self.last, self.in_step = now, False
        if self.due(step):
            self.gather(step)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()

    # ---------------------------------------------------------------- log steps

    def gather(self, step: int) -> None:
        """All-gather this window's per-step figures; rank 0 logs them and judges the window. Collective."""
        if self.timer is not None:
            self.sums["forward_s"] = self.timer.take()
        mine, steps = window_figures(self.sums, self.steps), self.steps
        self._reset()
        t = torch.tensor([mine[k] for k in FIELDS] + [float(steps)], dtype=torch.float64)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t, group=self.group)
        if self.rank != 0 or min(int(o[-1]) for o in out) == 0:
            return
        t0 = time.perf_counter()
        self.judge(step, [dict(zip(FIELDS, o[:-1].tolist())) for o in out])
        self.exclude(time.perf_counter() - t0)  # rank 0's logging: in the next window, not its pace

    def judge(self, step: int, rows: Sequence[Mapping[str, float]]) -> None:
        """Rank 0: log every rank's figures (``rows``, by rank) at ``step``, judge the window, and
        say when a rank is named slow or recovers."""
        metrics: Dict[str, float] = {
            RANK_KEY.format(rank=r, name=k): v for r, row in enumerate(rows) for k, v in row.items()
        }
        before = self.detector.current
        change, slowdown = self.detector.window([row["busy_s"] for row in rows], [row["forward_s"] for row in rows])
        metrics[SLOW_RANK_KEY] = float(-1 if self.detector.current is None else self.detector.current)
        metrics[SLOWDOWN_KEY] = slowdown
        self.logger.metrics(metrics, step)
        if change == "named":
            r, measure = self.detector.current, self.detector.measure
            assert r is not None
            self.say(named_line(r, self.nodes[r], rows, measure, self.detector.patience, step))
        elif change == "recovered":
            self.say(
                f"straggler: rank {before} keeps pace again at step {step} "
                f"(the slowest rank now {slowdown:.1f}x the median rank)"
            )


def named_line(
    rank: int, node: Tuple[str, str, str], rows: Sequence[Mapping[str, float]], measure: str, windows: int, step: int
) -> str:
    """The console line naming ``rank`` slow by ``measure`` (``busy_s`` or ``forward_s``) over the
    last ``windows`` log windows to ``step`` (``rows``: the last window's figures, by rank)."""
    host, ip, name = node
    values = [row[measure] for row in rows]
    ref = statistics.median_low(values)
    mine = rows[rank]
    what, why = {
        "busy_s": ("busy", "the others wait for it at every step"),
        "forward_s": ("forward", "its forward pass is slower (a throttled, shared or failing device?)"),
    }[measure]
    times = f"{values[rank] / ref:.1f}x" if ref > 0 else "far above"
    return (
        f"straggler: rank {rank} (host {host}, {ip}, node {name}) {what} {values[rank]:.2f} s/step, "
        f"{times} the median rank's {ref:.2f} s over {windows} log windows to step {step}: {why}; "
        f"it sets the pace of the run (data wait {mine['data_wait_s']:.2f} s/step, forward "
        f"{mine['forward_s']:.2f} s/step; system/rank/{rank}/* and system/{name}/* in MLflow)"
    )
