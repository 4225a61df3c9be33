"""The hang watchdog (``megaray.train.watchdog``) without Ray: timeouts per phase, the dump of a stuck
thread's stack, and the test hook that makes a rank hang. The end-to-end proof (a hung rank of a
2-worker run: dump, restart from the checkpoint, the per-step losses of an uninterrupted run) is
``tests/test_train_e2e.py::test_a_hung_rank_is_dumped_and_the_group_restarts_from_its_checkpoint``."""

from __future__ import annotations

import threading
import time

import pytest

from megaray.config import WatchdogConfig
from megaray.errors import ConfigError
from megaray.train.spec import DebugHooks
from megaray.train.watchdog import MIN_SAMPLES, Watchdog, log_dumps


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_times_out_at_its_floor_then_at_factor_x_its_median():
    clock = FakeClock()
    cfg = WatchdogConfig(factor=10, startup_timeout_s=900, step_timeout_s=5, eval_timeout_s=60)
    wd = Watchdog(cfg, 0, "/unused", on_timeout=lambda path: None, clock=clock)
    wd.arm("startup", 0)
    assert wd.deadline == pytest.approx(100 + 900)
    wd.arm("step", 1)  # startup is not a sample of any median
    assert wd.timeout("step") == 5 and not any(wd.durations.values())
    for _ in range(MIN_SAMPLES - 1):  # steps of 0.2 s: the floor still rules before MIN_SAMPLES
        clock.now += 0.2
        wd.arm("step", 1)
    assert wd.timeout("step") == 5
    clock.now += 2.0  # a slow step, and the fifth sample: the median is 0.2 s, 10 x 0.2 < floor
    wd.arm("step", 1)
    assert len(wd.durations["step"]) == MIN_SAMPLES and wd.timeout("step") == 5
    for _ in range(10):  # steps of 3 s: 10 x median 3 s = 30 s > the floor
        clock.now += 3.0
        wd.arm("step", 1)
    assert wd.timeout("step") == pytest.approx(30.0)
    assert wd.deadline == pytest.approx(clock.now + 30.0)
    wd.arm("eval", 10)  # each phase its own median: eval has none yet
    assert wd.deadline == pytest.approx(clock.now + 60) and wd.timeout("eval") == 60


def _wait_for(fired, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not fired and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_stuck_phase_dumps_every_threads_stack_with_a_header_tells_the_driver_and_acts(tmp_path):
    fired, told = [], []
    cfg = WatchdogConfig(step_timeout_s=0.3)
    wd = Watchdog(cfg, 3, str(tmp_path / "run"), on_timeout=fired.append, tell=told.append)
    stuck = threading.Event()

    def stuck_in_a_collective():  # the frame the dump must show
        stuck.wait(30)

    t = threading.Thread(target=stuck_in_a_collective, daemon=True)
    t.start()
    wd.start()  # startup: 1800 s; the thread sleeps towards that deadline ...
    wd.arm("step", 12)  # ... and is woken for the earlier one
    _wait_for(fired)
    stuck.set()
    assert len(fired) == 1 and fired[0] == wd.fired
    assert fired[0].startswith(str(tmp_path / "run" / "watchdog" / "rank3-pid"))
    text = open(fired[0]).read()
    head = text.splitlines()[0]
    assert head.startswith("watchdog: rank 3 (") and "stuck in step 12 for 0." in head
    assert "timeout 0.3s = train.watchdog.step_timeout_s=0.3; 0 step(s) measured" in head
    assert f"stacks in {fired[0]}; " in head and "restarts the group from the last checkpoint" in head
    assert told == [head]  # the driver's console gets the header line
    assert "stuck_in_a_collective" in text and "test_watchdog.py" in text  # the blocked thread's stack
    assert "Thread 0x" in text or "Current thread" in text


def test_the_header_names_the_median_once_measured(tmp_path):
    clock = FakeClock()
    wd = Watchdog(WatchdogConfig(step_timeout_s=5), 1, str(tmp_path), clock=clock)
    for _ in range(MIN_SAMPLES + 1):
        wd.arm("step", 7)
        clock.now += 0.31
    line = wd.describe("step", 12, 5.0, wd.timeout("step"))
    assert "stuck in step 12 for 5.0s (timeout 5.0s = max(train.watchdog.step_timeout_s=5, 10 x median 0.31s))" in line
    assert "stuck in eval at step 10 for" in wd.describe("eval", 10, 1.0, 1.0)
    assert "stuck in start-up for 2.0s (timeout 2.0s = train.watchdog.startup_timeout_s=1800)" in wd.describe(
        "startup", 0, 2.0, 2.0
    )


def test_re_arming_moves_the_deadline_and_stop_ends_the_watch(tmp_path):
    fired = []
    wd = Watchdog(WatchdogConfig(step_timeout_s=0.5), 0, str(tmp_path), on_timeout=fired.append).start()
    for _ in range(8):  # a healthy loop: every step ends well inside its timeout
        wd.arm("step", 1)
        time.sleep(0.1)
    wd.stop()
    time.sleep(0.7)
    assert fired == [] and not wd._thread.is_alive()


def test_a_watchdog_whose_training_thread_ended_stands_down(tmp_path):
    """The loop raised (Ray Train handles that failure): its last phase never ends, and no dump follows."""
    fired, box = [], {}

    def training_thread():
        box["wd"] = Watchdog(WatchdogConfig(step_timeout_s=0.2), 0, str(tmp_path), on_timeout=fired.append).start()
        box["wd"].arm("step", 3)  # and the thread ends without stop()

    t = threading.Thread(target=training_thread)
    t.start()
    t.join()
    box["wd"]._thread.join(10)
    assert not box["wd"]._thread.is_alive() and fired == [] and not (tmp_path / "watchdog").exists()


def test_the_default_action_kills_the_worker_process(tmp_path):
    """``kill_self`` (the default ``on_timeout``) SIGKILLs the process it runs in: run in a child."""
    import subprocess
    import sys

    code = "from megaray.train.watchdog import kill_self; kill_self('dump.txt'); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9 and "alive" not in out.stdout, out


def test_the_next_group_logs_the_dumps_to_mlflow(tmp_path):
    class Logger:
        enabled = True

        def __init__(self):
            self.texts = {}

        def text(self, text, artifact_file):
            self.texts[artifact_file] = text

    logger = Logger()
    assert log_dumps(logger, str(tmp_path / "run")) == 0  # no folder yet
    (tmp_path / "run" / "watchdog").mkdir(parents=True)
    (tmp_path / "run" / "watchdog" / "rank1-pid7.txt").write_text("watchdog: rank 1 ...\n")
    assert log_dumps(logger, str(tmp_path / "run")) == 1
    assert logger.texts == {"watchdog/rank1-pid7.txt": "watchdog: rank 1 ...\n"}


def test_the_hang_hook_names_a_rank_and_a_step():
    assert DebugHooks.from_env({"MEGARAY_HANG_AT_STEP": "1:12"}).hang_at == (1, 12)
    assert DebugHooks.from_env({}) is None
    for bad in ("soon", "1", "1:0", "-1:3", "1:2.5"):
        with pytest.raises(ConfigError, match=f"MEGARAY_HANG_AT_STEP='{bad}': expected RANK:STEP"):
            DebugHooks.from_env({"MEGARAY_HANG_AT_STEP": bad})


def test_the_hang_blocks_the_first_micro_batch_of_its_step_only_in_a_worker_that_started_the_run():
    from megaray.train.checkpoint import TrainState
    from megaray.train.extras import Hang, debug_parts

    hooks = DebugHooks(hang_at=(1, 12))
    assert [type(p) for p in debug_parts(hooks, 1)] == [Hang] and debug_parts(hooks, 0) == []
    restarted = Hang(12)
    restarted.start(TrainState(step=10), {})
    restarted.before_batch({}, TrainState(step=11), {})  # returns: the restarted group trains on
    first = Hang(12)
    first.start(TrainState(step=0), {})
    first.before_batch({}, TrainState(step=10), {})  # step 11: not its step
    t = threading.Thread(target=first.before_batch, args=({}, TrainState(step=11), {}), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()  # blocked at step 12's first micro-batch, for good
