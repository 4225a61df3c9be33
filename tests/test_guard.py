"""``train.guard`` (megaray.train.guard): a non-finite or spiking step is rolled back and its samples skipped.

Unit tests of the decision logic, the test hooks and the loop's skipping (no Ray), then one tiny
end-to-end run: the debug GPT, 1 worker, 14 steps, a checkpoint every 4, step 6 poisoned to NaN
and step 10 to a 1000x spike. It rolls back twice, skips both steps' samples and finishes with
the final loss of a clean run whose data leaves those samples out (``MEGARAY_SKIP_SAMPLES``); the
MLflow run holds the decisions and the skipped samples.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from megaray.config import GuardConfig
from megaray.errors import ConfigError
from megaray.train.checkpoint import TrainState
from megaray.train.extras import Poison, debug_parts
from megaray.train.guard import Guard, GuardTripped, SpikeDetector, _ranges
from megaray.train.loop import positioned_batches
from megaray.train.spec import DebugHooks, parse_samples


def _detector(**kw):
    args = dict(spike_factor=10.0, window=4, min_history=3, max_bad_in_a_row=3)
    args.update(kw)
    return SpikeDetector(**args)


def test_non_finite_values_are_bad_from_the_first_step():
    d = _detector()
    v = d.judge(1, {"loss": float("nan"), "grad_norm": 1.0})
    assert v.bad and v.reason == "nonfinite" and "loss nan" in v.detail and v.in_a_row == 1
    v = d.judge(2, {"loss": 5.0, "grad_norm": float("inf")})
    assert v.reason == "nonfinite" and "grad_norm inf" in v.detail and v.in_a_row == 2
    assert d.history == {}  # bad steps never join the history


def test_a_spike_is_judged_against_the_running_median_of_good_steps_only_after_min_history():
    d = _detector()
    assert not d.judge(1, {"loss": 1.0}).bad
    assert not d.judge(2, {"loss": 50.0}).bad  # 2 good steps < min_history 3: spikes not judged yet
    assert not d.judge(3, {"loss": 2.0}).bad
    v = d.judge(4, {"loss": 25.0})  # median(1, 50, 2) = 2: 25 > 10 x 2
    assert v.reason == "spike" and v.medians["loss"] == 2.0 and "loss 25 > 10 x median 2" in v.detail
    assert not d.judge(5, {"loss": 19.0}).bad and d.in_a_row == 0  # < 20: good; the bad count resets
    # the window keeps the last 4 good values: (50, 2, 19, 3) -> median 11; 100 is not > 110
    assert not d.judge(6, {"loss": 3.0}).bad
    assert list(d.history["loss"]) == [50.0, 2.0, 19.0, 3.0]
    assert not d.judge(7, {"loss": 100.0}).bad


def test_each_value_has_its_own_median_and_a_gan_engine_can_spike_alone():
    d = _detector(min_history=2)
    for s in (1, 2):
        d.judge(s, {"loss": 3.0, "grad_norm": 1.0, "grad_norm_disc": 0.5})
    v = d.judge(3, {"loss": 3.0, "grad_norm": 1.0, "grad_norm_disc": 6.0})
    assert v.reason == "spike" and v.detail.startswith("grad_norm_disc 6")


def test_max_bad_in_a_row_stops_the_run_instead_of_rolling_back_forever():
    d = _detector(max_bad_in_a_row=2)
    d.judge(1, {"loss": float("nan")})
    with pytest.raises(GuardTripped, match=r"step 2 is the 2th bad step in a row.*max_bad_in_a_row=2"):
        d.judge(2, {"loss": float("nan")})


def test_samples_parse_and_print_as_ranges():
    assert parse_samples("0:4-6, 1:2") == {(0, 4), (0, 5), (0, 6), (1, 2)}
    assert parse_samples("") == set()
    assert _ranges([(0, 4), (0, 5), (0, 6), (0, 9), (1, 2)]) == "epoch 0: 4-6, 9; epoch 1: 2"
    with pytest.raises(ValueError):
        parse_samples("0:a")


def test_debug_hooks_read_poison_and_skips_and_name_a_bad_value():
    h = DebugHooks.from_env({"MEGARAY_POISON_STEPS": "6:nan,9:spike,11:x50", "MEGARAY_SKIP_SAMPLES": "0:4-5"})
    assert h.poison[1:] == ((9, 1000.0), (11, 50.0)) and h.poison[0][0] == 6 and math.isnan(h.poison[0][1])
    assert h.skip_samples == ((0, 4), (0, 5))
    assert [type(p).__name__ for p in debug_parts(h, 0)] == ["Poison"]
    with pytest.raises(ConfigError, match=r"MEGARAY_POISON_STEPS='6:boom'.*STEP:nan"):
        DebugHooks.from_env({"MEGARAY_POISON_STEPS": "6:boom"})
    with pytest.raises(ConfigError, match=r"MEGARAY_SKIP_SAMPLES='x'"):
        DebugHooks.from_env({"MEGARAY_SKIP_SAMPLES": "x"})
    assert GuardConfig().enabled  # on by default


class _Engine:
    """A stand-in engine: ``backward`` records the loss; a fixed gradient norm."""

    def __init__(self, grad_norm=None):
        self.losses, self.grad_norm = [], grad_norm

    def backward(self, loss):
        self.losses.append(float(loss))

    def get_global_grad_norm(self):
        return self.grad_norm


def test_poison_scales_the_first_micro_batch_of_the_first_attempt_at_its_step_only():
    engine = _Engine()
    p = Poison({2: 1000.0})
    for step in (0, 1, 1):  # step 2 is attempted twice (a rollback in between)
        p.before_batch({}, TrainState(step=step), {"model": engine})
        engine.backward(torch.tensor(2.0))
        metrics = {"loss": 2.0}
        p.after_batch(metrics)
    assert engine.losses == [2.0, 2000.0, 2.0] and metrics == {"loss": 2.0}
    assert "backward" not in vars(engine)  # the engine's own method again


def test_the_guard_records_a_bad_steps_samples_and_logs_the_decision():
    logged = SimpleNamespace(metrics=[], text=[])
    logger = SimpleNamespace(
        metrics=lambda m, step: logged.metrics.append((step, m)), text=lambda t, f: logged.text.append((f, t))
    )
    lines = []
    cfg = GuardConfig(window=4, min_history=2)
    g = Guard(cfg, 0, 1, torch.device("cpu"), lines.append, logger, skip=[(0, 99)])
    engines = {"model": _Engine(1.0), "disc": _Engine(None)}
    state = TrainState()
    for step in range(1, 4):  # two micro-batches (accumulation 2) of 4 samples per step
        for _ in range(2):
            g.served([state.samples_in_epoch + i for i in range(4)])
            g.before_batch({}, state, engines)
            g.after_batch({"loss": 3.0 if step < 3 else float("nan")})
            state.samples_in_epoch += 4
        v = g.check(step, engines)
    assert v.bad and math.isnan(v.values["loss"]) and v.values["grad_norm"] == 1.0 and "grad_norm_disc" not in v.values
    assert g.skips == {(0, 99), (0, 16), (0, 20)}  # the first position of each of step 3's micro-batches
    g.rolled_back(v, 2, "/runs/x/step_00000002")
    assert "guard: step 3 is bad (loss nan); rolled back to step 2" in lines[0] and "epoch 0: 16-23" in lines[0]
    step, m = logged.metrics[0]
    assert step == 3 and m["guard/nonfinite"] == 1.0 and m["guard/rollbacks"] == 1.0
    assert m["guard/skipped_samples"] == 8.0
    name, text = logged.text[0]
    assert name == "guard/skipped_samples.json"
    assert json.loads(text)["skipped"][0]["samples"] == [[0, i] for i in range(16, 24)]


def test_a_spike_before_the_first_checkpoint_stands_and_its_samples_are_not_skipped():
    logged, lines = [], []
    logger = SimpleNamespace(metrics=lambda m, step: logged.append((step, m)), text=None)
    g = Guard(GuardConfig(window=4, min_history=2), 0, 1, torch.device("cpu"), lines.append, logger)
    state = TrainState()
    for step, loss in enumerate((2.0, 2.0, 90.0), start=1):
        g.served([state.samples_in_epoch])
        g.before_batch({}, state, {})
        g.after_batch({"loss": loss})
        state.samples_in_epoch += 1
        v = g.check(step, {})
    assert v.reason == "spike" and g.skips == {(0, 2)}
    g.kept(v)
    assert g.skips == set() and g.skipped == [] and "step 3 spikes" in lines[0] and "it stands" in lines[0]
    assert logged == [(3, {"guard/bad_steps": 1.0, "guard/spike": 1.0, "guard/kept": 1.0})]


def test_positioned_batches_pass_over_skipped_micro_batches_and_move_the_cursor():
    def stream():
        for first in range(0, 24, 4):  # rank 0 of 2, batch 2: its micro-batches at 0, 4, 8, ...
            yield {"epoch": torch.zeros(2, dtype=torch.long), "index": torch.arange(first, first + 2)}

    state = TrainState()
    got = []
    for _ in positioned_batches(stream(), 2, state, 0, 2, skip={(0, 4), (0, 12)}):
        got.append(state.samples_in_epoch)
        state.samples_in_epoch += 4  # what the loop does after training on it
        if len(got) == 4:
            break
    assert got == [0, 8, 16, 20]  # the micro-batches at 4 and 12 were passed over


@pytest.mark.slow
def test_guarded_run_rolls_back_skips_the_poisoned_samples_and_ends_as_a_clean_run_without_them(
    ray_cluster, text_shards, tmp_path, monkeypatch
):
    from conftest import REPO
    from mlflow.tracking import MlflowClient

    from megaray.families import load_config
    from megaray.train.launch import fit

    def run(name, **env):
        for k in ("MEGARAY_POISON_STEPS", "MEGARAY_SKIP_SAMPLES"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        sets = [
            f"name={name}",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.max_steps=14",
            "train.checkpoint_every=4",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.guard.window=4",
            "train.guard.min_history=3",
            "scaling.num_workers=1",
            "scaling.max_failures=0",
            "data.num_val_batches=1",
            "eval.sample_tokens=0",
            "tracking.system_metrics_interval_s=0",
            "tracking.log_model=false",
            "tracking.log_checkpoints=false",
        ]
        return fit(load_config(REPO / "configs" / "gpt_debug.yaml", sets), console=False)

    guarded = run("guarded", MEGARAY_POISON_STEPS="6:nan,10:spike")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    rid = guarded.mlflow_run_id
    local = client.download_artifacts(rid, "guard/skipped_samples.json", str(tmp_path))
    skipped = json.loads(open(local).read())["skipped"]
    assert [(s["step"], s["reason"]) for s in skipped] == [(6, "nonfinite"), (10, "spike")]
    assert [len(s["samples"]) for s in skipped] == [4, 4]  # one micro-batch of 4 per step
    history = {k: client.get_metric_history(rid, k) for k in ("guard/rollbacks", "guard/nonfinite", "guard/spike")}
    assert [(m.step, m.value) for m in history["guard/rollbacks"]] == [(6, 1.0), (10, 2.0)]
    assert [m.step for m in history["guard/nonfinite"] if m.value] == [6]
    assert [m.step for m in history["guard/spike"] if m.value] == [10]
    assert guarded.metrics["step"] == 14 and math.isfinite(guarded.metrics["loss"])

    samples = ",".join(f"{e}:{i}" for s in skipped for e, i in s["samples"])
    clean = run("clean", MEGARAY_SKIP_SAMPLES=samples)
    assert clean.metrics["step"] == 14
    assert guarded.metrics["loss"] == pytest.approx(clean.metrics["loss"], rel=1e-6, abs=1e-6)
    assert "guard/rollbacks" not in client.get_run(clean.mlflow_run_id).data.metrics
