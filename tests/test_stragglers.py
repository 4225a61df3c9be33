"""Straggler detection (``megaray.train.stragglers``) without Ray: the arithmetic, the rule over log
windows, the forward timer, the monitor driven through a simulated two-rank timeline (a fake clock
and fake collectives), and the test hook. The end-to-end proof (one of two ranks slowed, named in
the console; per-rank and per-node system metrics in a real MLflow server's run) is
``tests/test_train_e2e.py::test_two_worker_zero2_run_is_tracked_in_a_real_mlflow_server``."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Callable, Dict, List

import pytest
import torch

from megaray.config import StragglerConfig
from megaray.errors import ConfigError
from megaray.train import stragglers
from megaray.train.spec import DebugHooks
from megaray.train.stragglers import (
    RANK_KEY,
    SLOW_RANK_KEY,
    Detector,
    ForwardTimer,
    StragglerMonitor,
    lateness,
    slow_rank,
    window_figures,
)


def test_lateness_and_busy_time_come_from_the_waits_alone():
    # rank 1 arrives 0.3 s after rank 0 at the probe: rank 0 waits 0.3, rank 1 ~0
    assert lateness([0.30, 0.001]) == pytest.approx([0.0, 0.299])
    assert lateness([]) == []
    f = window_figures({"step_s": 2.0, "data_wait_s": 0.1, "compute_s": 0.5, "forward_s": 0.2, "wait_s": 1.5}, 5)
    assert f == pytest.approx(
        {"step_s": 0.4, "data_wait_s": 0.02, "compute_s": 0.1, "forward_s": 0.04, "wait_s": 0.3, "busy_s": 0.1}
    )
    assert window_figures({}, 0)["busy_s"] == 0.0  # an empty window divides by nothing


def test_the_slowest_rank_is_judged_against_the_lower_median():
    assert slow_rank([0.10, 0.40], 1.5) == (1, pytest.approx(4.0))  # 2 ranks: against the other one
    assert slow_rank([0.10, 0.11, 0.12, 0.30], 1.5) == (3, pytest.approx(0.30 / 0.11))  # median_low 0.11
    rank, slowdown = slow_rank([0.10, 0.12, 0.11, 0.13], 1.5)  # ordinary jitter
    assert rank is None and slowdown == pytest.approx(0.13 / 0.11)
    assert slow_rank([0.2], 1.5) == (None, 1.0)
    assert slow_rank([0.0004, 0.0012], 1.5)[0] is None  # 3x, but under a millisecond: timer noise
    assert slow_rank([0.0, 0.0], 1.5) == (None, 1.0)  # nothing timed


def test_a_rank_is_named_after_patience_windows_in_a_row_once_and_recovers():
    d = Detector(factor=1.5, patience=2)
    assert d.window([0.1, 0.4])[0] is None  # one slow window: not yet
    assert d.window([0.1, 0.1])[0] is None  # the streak breaks
    assert d.window([0.1, 0.4])[0] is None
    change, slowdown = d.window([0.1, 0.4])
    assert change == "named" and d.current == 1 and d.measure == "busy_s" and slowdown == pytest.approx(4.0)
    assert d.window([0.1, 0.5]) == (None, pytest.approx(5.0))  # named once, not at every window
    assert d.window([0.1, 0.1])[0] == "recovered" and d.current is None


def test_another_rank_taking_over_restarts_the_streak():
    d = Detector(factor=1.5, patience=2)
    d.window([0.1, 0.4, 0.1])
    assert d.window([0.4, 0.1, 0.1])[0] is None  # rank 0 now: its first window
    assert d.window([0.4, 0.1, 0.1])[0] == "named" and d.current == 0


def test_a_slow_forward_names_a_rank_whose_busy_time_looks_like_the_others():
    d = Detector(factor=1.5, patience=2)
    for _ in range(2):  # busy times equal (everyone leaves the gradient collective together)
        change, slowdown = d.window([0.50, 0.50], forward=[0.10, 0.25])
    assert change == "named" and d.current == 1 and d.measure == "forward_s" and slowdown == pytest.approx(2.5)


def test_the_forward_timer_counts_training_forwards_only():
    model = torch.nn.Linear(4, 4)
    timer = ForwardTimer(model)
    model(torch.zeros(2, 4))
    model(torch.zeros(2, 4))
    first = timer.take()
    assert first > 0 and timer.take() == 0.0  # taken: the next window starts empty
    model.eval()
    model(torch.zeros(2, 4))  # an evaluation's forward: not the rank's training pace
    assert timer.take() == 0.0
    model.train()
    timer.remove()
    model(torch.zeros(2, 4))
    assert timer.take() == 0.0 and not model._forward_hooks and not model._forward_pre_hooks


# ------------------------------------------------------------------ the monitor on a simulated timeline


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _simulate(
    monkeypatch, steps: int, log_every: int, sleep: Callable[[int, int], float], data: Callable[[int, int], float]
) -> tuple:
    """Two ranks training ``steps`` optimizer steps of one micro-batch, rank ``r`` sleeping
    ``sleep(r, k)`` s after step ``k`` and waiting ``data(r, k)`` s for its batch; 0.1 s of compute
    that both leave together (the gradient collective); rank 1 starts 5 s late. Each rank's real
    :class:`StragglerMonitor` runs on a fake clock whose probe releases at the later arrival.
    Returns rank 0's ``(lines, metrics by step)``."""
    world = 2
    # the timeline: when each rank arrives at step k's probe, and when the probe releases
    start = [0.0, 5.0]
    arrive: List[List[float]] = []
    release: List[float] = []
    for k in range(1, steps + 1):
        a = [start[r] + data(r, k) for r in range(world)]
        p = max(a)
        arrive.append(a)
        release.append(p)
        start = [p + 0.1 + sleep(r, k) for r in range(world)]
    gathered: Dict[int, Dict[int, torch.Tensor]] = {}  # call -> rank -> tensor
    lines: List[str] = []
    logged: Dict[int, Dict[str, float]] = {}
    for rank in reversed(range(world)):  # rank 0 last: it reads what the others gathered
        clock = _Clock()
        monkeypatch.setattr(stragglers, "time", SimpleNamespace(perf_counter=clock.perf_counter))
        k_now = [0]

        def all_reduce(t, group=None, _clock=clock, _k=k_now):
            _clock.now = release[_k[0] - 1]

        calls = [0]

        def all_gather(out, t, group=None, _rank=rank, _calls=calls):
            gathered.setdefault(_calls[0], {})[_rank] = t.clone()
            for r, o in enumerate(out):
                o.copy_(gathered[_calls[0]].get(r, t))
            _calls[0] += 1

        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
        logger = SimpleNamespace(metrics=lambda values, step: logged.setdefault(step, {}).update(values))
        nodes = [("host-a", "10.0.0.2", "host-a-1234abcd"), ("host-b", "10.0.0.3", "host-b-5678ef00")]
        mon = StragglerMonitor(
            StragglerConfig(),
            rank,
            world,
            lambda s: s % log_every == 0 or s >= steps,
            lines.append if rank == 0 else (lambda line: None),
            logger,
            nodes,
        )
        mon.start(None, {})
        clock.now = 0.0 if rank == 0 else 5.0
        for k in range(1, steps + 1):
            k_now[0] = k
            d = data(rank, k)
            clock.now = arrive[k - 1][rank]
            mon.data_wait(d)
            mon.before_batch({}, None, {})
            clock.now = release[k - 1] + 0.1
            mon.after_batch({})
            clock.now += sleep(rank, k)
            mon.after_step(k)
    return lines, logged


def test_the_monitor_names_a_rank_that_sleeps_after_each_step(monkeypatch):
    lines, logged = _simulate(monkeypatch, 20, 5, sleep=lambda r, k: 0.3 if r == 1 else 0.0, data=lambda r, k: 0.01)
    assert sorted(logged) == [5, 10, 15, 20]
    w = logged[5]  # steps 2-5 (the first step's start-up skew of 5 s is left out)
    assert w[RANK_KEY.format(rank=0, name="wait_s")] == pytest.approx(0.3)
    assert w[RANK_KEY.format(rank=1, name="wait_s")] == pytest.approx(0.0)
    assert w[RANK_KEY.format(rank=0, name="step_s")] == pytest.approx(0.41)
    assert w[RANK_KEY.format(rank=1, name="busy_s")] == pytest.approx(0.41)  # data + compute + its sleep
    assert w[RANK_KEY.format(rank=0, name="busy_s")] == pytest.approx(0.11)
    assert w[RANK_KEY.format(rank=0, name="compute_s")] == w[RANK_KEY.format(rank=1, name="compute_s")]
    assert [logged[s][SLOW_RANK_KEY] for s in (5, 10, 15, 20)] == [-1, 1, 1, 1]  # named at the 2nd window
    assert len(lines) == 1 and lines[0].startswith(
        "straggler: rank 1 (host host-b, 10.0.0.3, node host-b-5678ef00) busy 0.41 s/step, 3.7x the median "
        "rank's 0.11 s over 2 log windows to step 10"
    ), lines


def test_the_monitor_names_slow_data_and_says_when_the_rank_recovers(monkeypatch):
    lines, logged = _simulate(
        monkeypatch, 30, 5, sleep=lambda r, k: 0.0, data=lambda r, k: 0.5 if r == 0 and k <= 15 else 0.01
    )
    assert [logged[s][SLOW_RANK_KEY] for s in (5, 10, 15, 20, 25, 30)] == [-1, 0, 0, -1, -1, -1]
    assert lines[0].startswith("straggler: rank 0 (host host-a") and "data wait 0.50 s/step" in lines[0]
    assert lines[1].startswith("straggler: rank 0 keeps pace again at step 20")


def test_the_monitor_names_no_one_in_ordinary_jitter(monkeypatch):
    rng = random.Random(0)
    jitter: Dict[tuple, float] = {}

    def noisy(r: int, k: int) -> float:
        return jitter.setdefault((r, k), rng.uniform(0.0, 0.04))

    lines, logged = _simulate(monkeypatch, 40, 5, sleep=noisy, data=lambda r, k: noisy(r, -k))
    assert lines == [] and all(m[SLOW_RANK_KEY] == -1 for m in logged.values())


def test_the_slow_rank_hook_names_a_rank_and_seconds():
    from megaray.train.extras import StepSleep, debug_parts

    hooks = DebugHooks.from_env({"MEGARAY_SLOW_RANK": "1:0.25"})
    assert hooks.slow_rank == (1, 0.25)
    parts = debug_parts(hooks, 1)
    assert [type(p) for p in parts] == [StepSleep] and parts[0].seconds == 0.25 and debug_parts(hooks, 0) == []
    for bad in ("1", "x:0.3", "1:abc", "-1:0.3", "1:-0.5", "1:nan"):
        with pytest.raises(ConfigError, match=f"MEGARAY_SLOW_RANK='{bad}': expected RANK:SECONDS"):
            DebugHooks.from_env({"MEGARAY_SLOW_RANK": bad})
