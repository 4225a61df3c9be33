"""Straggler detection (``megaray.train.stragglers``) without Ray: the rule over log windows and the
test hook. The end-to-end proof (one of two ranks slowed, named in the console; ``rank/*`` and
per-node system metrics in a real MLflow server's run) is
``tests/test_train_e2e.py::test_two_worker_zero2_run_is_tracked_in_a_real_mlflow_server``."""

from __future__ import annotations

import pytest

from megaray.errors import ConfigError
from megaray.train.spec import DebugHooks
from megaray.train.stragglers import Detector, slow_rank


def test_the_slowest_rank_is_judged_against_the_lower_median():
    assert slow_rank([0.10, 0.40], 1.5) == (1, pytest.approx(4.0))  # 2 ranks: against the other one
    assert slow_rank([0.10, 0.11, 0.12, 0.30], 1.5) == (3, pytest.approx(0.30 / 0.11))  # median_low 0.11
    rank, slowdown = slow_rank([0.10, 0.12, 0.11, 0.13], 1.5)  # ordinary jitter
    assert rank is None and slowdown == pytest.approx(0.13 / 0.11)
    assert slow_rank([0.2], 1.5) == (None, 1.0)


def test_a_rank_is_named_after_patience_windows_in_a_row_once_and_recovers():
    d = Detector(factor=1.5, patience=2)
    assert d.window([0.1, 0.4])[0] is None  # one slow window: not yet
    assert d.window([0.1, 0.1])[0] is None  # the streak breaks
    assert d.window([0.1, 0.4])[0] is None
    change, slowdown = d.window([0.1, 0.4])
    assert change == "named" and d.current == 1 and slowdown == pytest.approx(4.0)
    assert d.window([0.1, 0.5]) == (None, pytest.approx(5.0))  # named once, not at every window
    assert d.window([0.1, 0.1])[0] == "recovered" and d.current is None


def test_another_rank_taking_over_restarts_the_streak():
    d = Detector(factor=1.5, patience=2)
    d.window([0.1, 0.4, 0.1])
    assert d.window([0.4, 0.1, 0.1])[0] is None  # rank 0 now: its first window
    assert d.window([0.4, 0.1, 0.1])[0] == "named" and d.current == 0


def test_the_slow_rank_hook_names_a_rank_and_seconds():
    from megaray.train.extras import StepSleep, debug_parts

    hooks = DebugHooks.from_env({"MEGARAY_SLOW_RANK": "1:0.25"})
    assert hooks.slow_rank == (1, 0.25)
    parts = debug_parts(hooks, 1)
    assert [type(p) for p in parts] == [StepSleep] and parts[0].seconds == 0.25 and debug_parts(hooks, 0) == []
    with pytest.raises(ConfigError, match="MEGARAY_SLOW_RANK='1': expected RANK:SECONDS"):
        DebugHooks.from_env({"MEGARAY_SLOW_RANK": "1"})
