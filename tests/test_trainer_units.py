"""Unit tests of the training loop's parts and the task hooks (no Ray cluster, no DeepSpeed engine)."""

from __future__ import annotations

import pytest
import torch
from helpers import StandInEngine

from megaray.train import reporter


def test_report_pacer_holds_back_progress_reports_inside_the_poll_interval(monkeypatch):
    """Ray Train V2 drains one report per worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a
    progress report sooner than that would block the loop, so the pacer holds it back."""
    now = [100.0]
    monkeypatch.setattr(reporter.time, "monotonic", lambda: now[0])
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")
    p = reporter.ReportPacer()
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
    assert reporter.ReportPacer().interval_s == pytest.approx(0.25)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    assert reporter.ReportPacer().interval_s == pytest.approx(2.0)  # Ray Train V2's default


def test_meter_throughput_and_data_wait():
    m = reporter.Meter()
    m.add({"loss": 4.0}, data_s=0.1, total_s=1.0, units=100)
    m.add({"loss": 2.0}, data_s=0.3, total_s=1.0, units=300)
    out = m.summary(flops_per_unit=10.0, peak=4000.0, world=2)
    assert out["loss"] == pytest.approx(3.0)
    assert out["throughput"] == pytest.approx(200.0)  # 400 units in 2 s
    assert out["data_wait_frac"] == pytest.approx(0.2)
    assert out["mfu"] == pytest.approx(10.0 * 200.0 / (4000.0 * 2))


# --------------------------------------------------------------------------- EMA


def test_ema_follows_the_polyak_update_in_fp32_and_round_trips():
    import torch

    from megaray.train.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).to(torch.bfloat16)
    ema = EMA(net, decay=0.9)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.module.parameters())
    start = [p.detach().float().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for e, s, p in zip(ema.module.parameters(), start, net.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p.float())  # ema = d * ema + (1 - d) * w
    other = EMA(torch.nn.Linear(4, 3), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(other.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)


def test_ema_is_refused_under_zero3_with_the_reason():
    from megaray.errors import ConfigError
    from megaray.families import build_run_config
    from megaray.train.ema import check_supported

    cfg = build_run_config(
        {"model": {"family": "gpt", "preset": "debug"}, "train": {"ema_decay": 0.999, "zero_stage": 3}}
    )
    with pytest.raises(ConfigError, match=r"train.ema_decay: .*ZeRO stage 3 partitions"):
        check_supported(cfg)
    check_supported(build_run_config({"model": {"family": "gpt", "preset": "debug"}, "train": {"ema_decay": 0.999}}))


# --------------------------------------------------------------------------- per-module optimizer settings


def test_module_optimizer_settings_fall_back_to_train_and_unknown_modules_are_named():
    from megaray.errors import ConfigError
    from megaray.families import build_run_config
    from megaray.tasks.vocoder import VocoderTask
    from megaray.train.launch import check_run

    cfg = build_run_config(
        {
            "model": {"family": "vocoder", "preset": "tiny_lightheaded_freq_domain_vocoder", "adversarial": True},
            "train": {
                "lr": 2e-4,
                "min_lr": 2e-5,
                "betas": [0.8, 0.99],
                "modules": {"disc": {"lr": 1e-4, "betas": [0.5, 0.9]}},
            },
        }
    )
    disc, gen = cfg.train.optim_for("disc"), cfg.train.optim_for("model")
    assert (disc.lr, disc.betas, disc.weight_decay) == (1e-4, [0.5, 0.9], cfg.train.weight_decay)
    assert disc.min_lr == pytest.approx(1e-5)  # train's min_lr / lr ratio kept
    assert (gen.lr, gen.min_lr, gen.betas) == (2e-4, 2e-5, [0.8, 0.99])
    task = VocoderTask(cfg)
    check_run(cfg, task)
    groups = task.param_groups("disc", task.build_modules()["disc"])
    assert groups[0]["weight_decay"] == cfg.train.weight_decay and groups[1]["weight_decay"] == 0.0
    bad = cfg.model_copy(deep=True)
    bad.train.modules = {"dsic": {"lr": 1e-4}}
    with pytest.raises(ConfigError, match=r"train.modules.dsic: .*no module 'dsic'.*disc"):
        check_run(bad, task)


# --------------------------------------------------------------------------- adversarial step


def _Engine(module):
    """A stand-in engine over plain SGD (lr 0.1)."""
    return StandInEngine(module, lr=0.1, optim=torch.optim.SGD)


def _toy_gan():
    import torch

    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    disc = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 1))
    return gen, disc, torch.randn(4, 8), torch.randn(4, 8)


def test_adaptive_weight_is_taming_transformers_calculate_adaptive_weight():
    """Reference: taming/modules/losses/vqperceptual.py, VQLPIPSWithDiscriminator.calculate_adaptive_weight."""
    import torch

    from megaray.tasks.adversarial import AdversarialStep

    gen, disc, x, real = _toy_gan()
    fake = gen(x)
    rec = (fake - real).abs().mean()
    last = gen[2].weight
    g_loss = -disc(fake).mean()
    nll_grads = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    expected = 0.5 * torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()

    step = AdversarialStep(
        lambda r, f: (1 - r).relu().mean() + (1 + f).relu().mean(), lambda f: -f.mean(), adv_weight=0.5, adaptive=True
    )
    loss, m = step.generator_loss(_Engine(disc), real, fake, rec, last_layer=last)
    assert m["adv_weight"] == pytest.approx(float(expected))
    assert float(loss.detach()) == pytest.approx(float((rec + expected * g_loss).detach()), rel=1e-6)
    with pytest.raises(ValueError, match="last_layer"):
        AdversarialStep(lambda r, f: r.mean(), lambda f: f.mean(), adaptive=True).generator_loss(disc, real, fake, rec)


def test_adversarial_step_trains_the_discriminator_from_start_step_and_leaves_it_no_generator_grads():
    import torch

    from megaray.tasks.adversarial import AdversarialStep

    gen, disc, x, real = _toy_gan()
    d_engine = _Engine(disc)
    lsgan_d = lambda r, f: ((r - 1) ** 2).mean() + (f**2).mean()  # noqa: E731
    step = AdversarialStep(
        lsgan_d,
        lambda f: ((f - 1) ** 2).mean(),
        lambda r, f: (r - f).abs().mean(),
        start_step=3,
        adv_weight=1.0,
        fm_weight=2.0,
    )
    fake = gen(x)
    base = (fake - real).abs().mean()
    loss, m = step(d_engine, real, fake, base, step=2)
    assert loss is base and m == {} and d_engine.steps == 0  # before start_step: reconstruction only
    before = [p.detach().clone() for p in disc.parameters()]
    loss, m = step(d_engine, real, fake, base, step=3)
    assert d_engine.steps == 1 and any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    with torch.no_grad():  # the generator's loss through the *updated* discriminator
        d_fake, d_real = disc(fake), disc(real)
        want = base + ((d_fake - 1) ** 2).mean() + 2.0 * (d_real - d_fake).abs().mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    assert {"loss_disc", "loss_gen_adv", "loss_fm"} == set(m)
    loss.backward()
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())
    assert all(p.grad is not None for p in gen.parameters())


# --------------------------------------------------------------------------- errors inside workers


def test_user_errors_end_the_run_and_crashes_are_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from megaray.errors import DataError
    from megaray.train.ray_compat import UserErrorFailurePolicy, user_error

    bad = DataError("shard data/x/train-00000.parquet row group 3 is corrupt")
    wrapped = RuntimeError("reading failed")
    wrapped.__cause__ = bad
    for failures in ({1: bad}, {0: RuntimeError("collateral: gloo connection reset"), 1: wrapped}):
        err = WorkerGroupError("boom", failures)
        assert user_error(err) is bad
        assert UserErrorFailurePolicy(FailureConfig(max_failures=2)).make_decision(err) == FailureDecision.RAISE
    noted = DataError(
        f"{bad}\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
        "To change retry attempts, backoff, ... configure `ray.data.DataContext.get_current()`"
    )
    found = user_error(WorkerGroupError("boom", {0: noted}))  # Ray Data's retry note is cut
    assert type(found) is DataError and str(found) == str(bad)
    crash = WorkerGroupError("boom", {0: RuntimeError("worker died")})
    assert user_error(crash) is None
    policy = UserErrorFailurePolicy(FailureConfig(max_failures=1))
    assert policy.make_decision(crash) == FailureDecision.RETRY
    assert policy.make_decision(crash) == FailureDecision.RAISE  # max_failures spent


def test_data_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    from megaray.families import build_run_config
    from megaray.train.launch import resolve_paths

    monkeypatch.chdir(tmp_path)
    cfg = build_run_config(
        {
            "model": {"family": "gpt", "preset": "debug"},
            "data": {
                "shards": "data/speech-tiny",
                "sources": [{"shards": "data/a", "weight": 2}, {"shards": "s3://bucket/b"}],
            },
        }
    )
    out = resolve_paths(cfg)
    assert out.data.shards == str(tmp_path / "data" / "speech-tiny")
    assert [s.shards for s in out.data.sources] == [str(tmp_path / "data" / "a"), "s3://bucket/b"]
    assert out.data.sources[0].weight == 2 and cfg.data.shards == "data/speech-tiny"  # the input is untouched


# --------------------------------------------------------------------------- checkpoints and resume


def test_truncated_weights_name_the_file_and_ema_weights_are_preferred(tmp_path):
    import json

    import torch

    from megaray.errors import CheckpointError
    from megaray.families import build_model, build_run_config
    from megaray.train.checkpoint import EMA_FILE, STATE_FILE, WEIGHTS_FILE, load_for_inference

    cfg = build_run_config({"model": {"family": "gpt", "preset": "debug", "n_layer": 1}})
    ckpt = tmp_path / "run" / "step_00000004"
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 4}))
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), ckpt / WEIGHTS_FILE)
    ema = {k: torch.full_like(v, 0.5) for k, v in build_model(cfg.model).state_dict().items()}
    torch.save(ema, ckpt / EMA_FILE)
    model, _, _ = load_for_inference(tmp_path / "run")
    assert all(torch.all(p == 0.5) for p in model.parameters())  # EMA weights when the run kept them
    data = (ckpt / EMA_FILE).read_bytes()
    (ckpt / EMA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000004/ema.pt is truncated or corrupt \("):
        load_for_inference(ckpt)
    (ckpt / EMA_FILE).unlink()
    data = (ckpt / WEIGHTS_FILE).read_bytes()
    (ckpt / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000004/model.pt is truncated or corrupt \("):
        load_for_inference(ckpt)


def test_after_each_optimizer_step_the_task_hook_runs_before_the_ema_and_parts_decide_if_due():
    from megaray.train.loop import _Worker

    calls = []

    class Part:
        def __init__(self, name, every):
            self.name, self.every = name, every

        def due(self, step):
            return step % self.every == 0

    class Task:
        def after_step(self, engines, step):
            calls.append(("after_step", step))

    class Ema:
        def update(self, module):
            calls.append(("ema", module))

    class Reporter(Part):
        time = reporter.TimeAccount(None)

        def progress(self, engines, step):
            calls.append(("progress", step))
            return {"loss": 1.0}

        def publish(self, report, step, state, checkpoint):
            calls.append(("publish", step, sorted(report), checkpoint is not None))

    class Evaluator(Part):
        reads = 1

        def run(self, engines, step, reporter):
            calls.append(("eval", step))
            return {"val_loss": 2.0}

    class Engine:
        module = "the model"

    w = object.__new__(_Worker)
    w.task, w.ema, w.engines, w.state = Task(), Ema(), {"model": Engine()}, None
    w.reporter, w.evaluator, w.checkpointer = Reporter("log", 2), Evaluator("eval", 3), Part("ckpt", 4)
    w.extras, w.paused = (), False  # a normal run: no optional parts
    w.watchdog = w.stragglers = None  # train.watchdog / train.stragglers off (their own tests)
    for step in (1, 2, 3, 4):
        w.end_of_step(step)
    assert calls == [
        ("after_step", 1),
        ("ema", "the model"),
        ("after_step", 2),
        ("ema", "the model"),
        ("progress", 2),
        ("publish", 2, ["loss"], False),
        ("after_step", 3),
        ("ema", "the model"),
        ("eval", 3),
        ("publish", 3, ["val_loss"], False),
        ("after_step", 4),
        ("ema", "the model"),
        ("progress", 4),
        ("publish", 4, ["loss"], True),
    ]


# --------------------------------------------------------------------------- the hand-offs


def _spec(**kw):
    from megaray.families import build_run_config
    from megaray.tasks.base import TaskInfo
    from megaray.train.spec import WorkerSpec

    cfg = build_run_config({"model": {"family": "gpt", "preset": "debug"}})
    return WorkerSpec(run=cfg.model_dump(mode="json"), info=TaskInfo(val_samples=4), run_dir="/tmp/runs/x", **kw)


def test_the_worker_spec_survives_rays_pickling_and_is_read_back_typed():
    import cloudpickle

    from megaray.train.spec import DebugHooks, WorkerSpec

    spec = _spec(tracking_uri="sqlite:///m.db", mlflow_run_id="abc", t0=1.5, debug=DebugHooks(trace="/tmp/t"))
    config = cloudpickle.loads(cloudpickle.dumps(spec.loop_config()))  # as Ray ships train_loop_config
    got = WorkerSpec.of(config)
    assert got == spec and got.info.val_samples == 4 and got.debug.trace == "/tmp/t"
    assert got.run_config().model.family == "gpt" and got.run_config().model.n_layer == 2  # typed again
    with pytest.raises(TypeError, match=r"train_loop_config must be \{'spec': WorkerSpec\}.*keys \['debug', 'run'\]"):
        WorkerSpec.of({"run": {}, "debug": {}})  # the old untyped dict


def test_test_hooks_come_from_the_environment_and_a_normal_run_asks_for_none():
    from megaray.errors import ConfigError
    from megaray.train.spec import DebugHooks

    assert DebugHooks.from_env({}) is None and DebugHooks.from_env({"MEGARAY_TRACE": ""}) is None
    assert DebugHooks.from_env({"MEGARAY_FAULT_AT_STEP": "3", "MEGARAY_STEP_SLEEP_S": "0.5"}) == DebugHooks(
        fault_at_step=3, step_sleep_s=0.5
    )
    with pytest.raises(ConfigError, match="MEGARAY_FAULT_AT_STEP='x': expected a step number"):
        DebugHooks.from_env({"MEGARAY_FAULT_AT_STEP": "x"})


def test_optional_parts_are_built_only_when_asked_for(tmp_path):
    from megaray.train.extras import FaultAtStep, StepSleep, Trace
    from megaray.train.loop import build_extras
    from megaray.train.profiler import Profiler
    from megaray.train.spec import DebugHooks

    cpu = torch.device("cpu")
    assert build_extras(_spec(), 0, cpu, print, None) == ()  # a normal run: nothing built
    hooks = DebugHooks(trace=str(tmp_path / "t"), fault_at_step=2, step_sleep_s=0.01)
    assert [type(p) for p in build_extras(_spec(debug=hooks), 0, cpu, print, None)] == [Trace, FaultAtStep, StepSleep]
    assert [type(p) for p in build_extras(_spec(debug=hooks), 1, cpu, print, None)] == [
        Trace,
        StepSleep,
    ]  # rank 0 crashes
    [prof] = build_extras(_spec(profile=3), 1, cpu, print, None)
    assert isinstance(prof, Profiler) and prof.pauses_eval_and_checkpoints and not prof.record  # every rank pauses
    prof.start(None, {})  # a rank that does not record starts nothing
    prof.after_step(1)
    prof.close()


def test_the_trace_writes_the_format_the_tests_read(tmp_path):
    import json

    from megaray.train.checkpoint import TrainState
    from megaray.train.extras import Trace

    class Engine:
        def get_lr(self):
            return [0.25]

    trace = Trace(str(tmp_path / "t"), rank=1)
    state = TrainState(step=4, epoch=1, samples_in_epoch=8, world_size=2)
    trace.start(state, {"model": torch.nn.Linear(2, 1, bias=False)})
    trace.served([10, 11])
    trace.before_batch({"x": torch.arange(4)}, state, {"model": Engine()})
    trace.after_batch({"loss": 1.5})
    trace.evaluated(5, 2)
    trace.close()
    [line] = [json.loads(x) for x in (tmp_path / "t.rank1").read_text().splitlines()]
    assert list(line) == [
        "step",
        "epoch",
        "cursor",
        "fp",
        "lr",
        "pid",
        "replayed",
        "ids",
        "world",
        "t",
        "t_end",
        "loss",
    ]
    assert (line["step"], line["epoch"], line["cursor"], line["lr"], line["ids"], line["world"], line["loss"]) == (
        5,
        1,
        8,
        0.25,
        [10, 11],
        2,
        1.5,
    )
    [start] = [json.loads(x) for x in (tmp_path / "t.starts.rank1").read_text().splitlines()]
    assert (
        list(start) == ["pid", "step", "weights_l1", "marks"]
        and start["step"] == 4
        and set(start["weights_l1"]) == {"model"}
    )
    [ev] = [json.loads(x) for x in (tmp_path / "t.evals.rank1").read_text().splitlines()]
    assert ev["step"] == 5 and ev["val_reads"] == 2


def test_a_paused_run_neither_evaluates_nor_checkpoints_and_faults_come_after_the_reports():
    from megaray.train.extras import Extra, FaultAtStep
    from megaray.train.loop import _Worker

    calls = []

    class Part:
        def __init__(self, name):
            self.name = name

        def due(self, step):
            return True

        def progress(self, engines, step):
            return {"loss": 1.0}

        def publish(self, report, step, state, checkpoint):
            calls.append(("publish", step, sorted(report), checkpoint is not None))

        def run(self, engines, step, reporter):
            calls.append(("eval", step))
            return {"val_loss": 2.0}

    class Paused(Extra):
        pauses_eval_and_checkpoints = True

        def after_step(self, step):
            calls.append(("after_step", step))

    class Task:
        def after_step(self, engines, step):
            pass

    w = object.__new__(_Worker)
    w.task, w.ema, w.engines, w.state = Task(), None, {}, None
    w.reporter, w.evaluator, w.checkpointer = Part("log"), Part("eval"), Part("ckpt")
    w.reporter.time = reporter.TimeAccount(None)
    w.extras, w.paused = (Paused(), FaultAtStep(2)), True
    w.watchdog = w.stragglers = None
    w.end_of_step(1)
    assert calls == [("publish", 1, ["loss"], False), ("after_step", 1)]
    with pytest.raises(RuntimeError, match="MEGARAY_FAULT_AT_STEP: injected failure after step 2"):
        w.end_of_step(2)
    assert calls[-1] == ("after_step", 2)  # the fault comes after the step's reports and parts


def test_the_engine_protocol_names_what_tasks_use_and_stand_ins_and_deepspeed_have_it():
    from deepspeed import DeepSpeedEngine

    from megaray.tasks.base import CountingEngine, Engine

    class Minimal:  # only what train_step uses
        module = torch.nn.Linear(2, 2)

        def __call__(self, *a):
            return self.module(*a)

        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

    assert isinstance(Minimal(), Engine) and not isinstance(Minimal(), CountingEngine)  # enough for train_step
    assert isinstance(_Engine(torch.nn.Linear(2, 2)), CountingEngine)  # the shared stand-in has the step clock too
    assert not isinstance(torch.nn.Linear(2, 2), Engine)  # a plain module has no backward()
    assert all(callable(getattr(DeepSpeedEngine, m)) for m in ("__call__", "backward", "step"))
