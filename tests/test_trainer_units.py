"""Unit tests of the training loop's helpers (no Ray cluster, no DeepSpeed engine)."""

from __future__ import annotations

import pytest

from megaray.train import loop


def test_report_pacer_holds_back_progress_reports_inside_the_poll_interval(monkeypatch):
    """Ray Train V2 drains one report per worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a
    progress report sooner than that would block the loop, so the pacer holds it back."""
    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")
    p = loop._ReportPacer()
    assert p.due(world=1)  # nothing sent yet
    p.sent()
    now[0] += 0.5
    assert not p.due(world=1)
    now[0] += 1.0
    assert not p.due(world=1)
    now[0] += 0.5  # 2.0 s after the last report
    assert p.due(world=1)
    assert p.skipped == 2


def test_report_pacer_reads_the_controller_poll_interval(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    assert loop._ReportPacer().interval_s == pytest.approx(0.25)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    assert loop._ReportPacer().interval_s == pytest.approx(2.0)  # Ray Train V2's default


def test_meter_throughput_and_data_wait():
    m = loop._Meter()
    m.add({"loss": 4.0}, data_s=0.1, total_s=1.0, units=100)
    m.add({"loss": 2.0}, data_s=0.3, total_s=1.0, units=300)
    out = m.summary(flops_per_unit=10.0, peak=4000.0, world=2)
    assert out["loss"] == pytest.approx(3.0)
    assert out["throughput"] == pytest.approx(200.0)  # 400 units in 2 s
    assert out["data_wait_frac"] == pytest.approx(0.2)
    assert out["mfu"] == pytest.approx(10.0 * 200.0 / (4000.0 * 2))
