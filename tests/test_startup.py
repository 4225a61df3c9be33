"""Start-up (issue #22, benchmarks/goodput.py): what a local Ray cluster is started with, the
start-up marks, and the validation split asked for at the first evaluation, not at start-up."""

from __future__ import annotations

import os

from megaray.families import build_run_config


def test_a_local_cluster_gets_the_worker_variables_through_its_environment(monkeypatch):
    """Inherited, not a job runtime_env (which sends every Ray worker through runtime-env set-up);
    no preemption watcher and no prestarted workers unless the user set them; this process's
    environment is as before afterwards."""
    import ray

    from megaray.train import launch

    seen = {}

    def init(**kw):
        seen.update(kw, environ=dict(os.environ))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's choice stands
    before = dict(os.environ)
    launch.ensure_ray(num_cpus=8)
    assert "runtime_env" not in seen and seen["address"] == "local"
    env = seen["environ"]
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert env["OMP_NUM_THREADS"] == before.get("OMP_NUM_THREADS", "1")
    assert env["RAY_prestart_worker_first_driver"] == "0" and env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    keys = ("TOKENIZERS_PARALLELISM", "RAY_TRAIN_ENABLE_PRINT_PATCH", "OMP_NUM_THREADS")
    keys += ("RAY_prestart_worker_first_driver", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    assert {k: os.environ.get(k) for k in keys} == {k: before.get(k) for k in keys}


def test_startup_marks_keep_the_first_of_each_name():
    from megaray.train import startup

    startup.MARKS.clear()
    startup.mark("engines")
    first = startup.MARKS["engines"]
    startup.mark("engines")
    marks = startup.marks()
    assert marks["engines"] == first and list(marks)[0] == "process" and 0 < marks["process"] <= first
    startup.MARKS.clear()


def test_the_validation_shard_is_asked_for_at_the_first_evaluation():
    """Ray Train starts the split's coordinator (a process) when rank 0 asks for the shard: not
    during start-up, and once."""
    import torch

    from megaray.train.evaluator import Evaluator

    class Shard:
        def iter_torch_batches(self, batch_size, drop_last):
            return iter([{"x": torch.zeros(batch_size, 2)}] * 4)

    class Info:
        val_batches = 2

    class Task:
        info = Info()

    asked = []
    cfg = build_run_config({"model": {"family": "gpt", "preset": "debug"}})
    ev = Evaluator(Task(), cfg, lambda: asked.append(1) or Shard(), 1, {})
    assert asked == []
    assert len(ev.batches()) == 2 and asked == [1]
    ev.cache = None
    ev.batches()
    assert asked == [1] and ev.reads == 2
