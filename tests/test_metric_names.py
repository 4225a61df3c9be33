"""Metric names a person meets (issue 23): the model's charts come first in the MLflow UI, and the
console's eval line shows the model's metrics, not bookkeeping counts. Unit tests, no Ray."""

from __future__ import annotations

from typing import Dict, List

from megaray.train.evaluator import Evaluator
from megaray.train.reporter import COUNT_PREFIXES, GOODPUT, TimeAccount, is_count, ratio_metrics, time_key


def mlflow_sections(keys: List[str]) -> List[str]:
    """The chart sections of a run in MLflow 3.x's UI, top to bottom, as
    ``RunsChartsSetupUtils.getBaseChartAndSectionConfigs`` (mlflow/server/js) builds them: one per
    metric-name prefix (``extractChartSectionName``: everything before the last ``/``), sorted by
    name, then "Model metrics" (no prefix), then "System metrics" (``system/``)."""
    names = {k.rsplit("/", 1)[0] if "/" in k else "Model metrics" for k in keys}
    names = {"System metrics" if n == "system" else n for n in names}
    last = ["Model metrics", "System metrics"]
    return sorted(n for n in names if n not in last) + [n for n in last if n in names]


def test_time_buckets_sort_after_the_model_metrics_in_mlflow():
    clock = TimeAccount(run_t0=None)
    clock.micro_batch(data_s=0.01, compute_s=0.02)
    clock.add("eval", 0.5)
    timing = clock.metrics()
    buckets = ("step", "data_wait", "eval", "checkpoint", "resize", "wall", "startup")
    assert set(timing) == {GOODPUT, *(time_key(b) for b in buckets)}
    assert time_key("startup") == "system/time_startup_s" and timing[time_key("eval")] == 0.5
    keys = ["loss", "val_loss", "val_ppl", "lr", "grad_norm", *timing]
    assert mlflow_sections(keys) == ["Model metrics", "System metrics"]
    # what the old names did: a "time" section above the losses
    assert mlflow_sections(["loss", "val_loss", "time/step_s"])[0] == "time"
    assert clock.summary().startswith("time: goodput ") and "startup " in clock.summary()


def run_page_tab(keys: List[str], tab: str) -> List[str]:
    """The chart sections of a run's page in MLflow 3.x's UI, in its "Model metrics" or "System
    metrics" tab (``tab``: "model" or "system"): the run page passes ``filterMetricNames`` (keys
    starting ``system/`` go to the System metrics tab, the others to the Model metrics tab) to the
    same ``getBaseChartAndSectionConfigs`` (:func:`mlflow_sections`)."""
    return mlflow_sections([k for k in keys if k.startswith("system/") == (tab == "system")])


def test_per_rank_and_per_node_health_stays_off_the_model_metrics_tab():
    from megaray.train.mlflow import node_name
    from megaray.train.stragglers import FIELDS, RANK_KEY, SLOW_RANK_KEY, SLOWDOWN_KEY

    node = node_name("ip-10-0-0-3", "84efcb20aa55")
    assert node == "ip-10-0-0-3-84efcb20"
    health = [RANK_KEY.format(rank=r, name=n) for r in (0, 1) for n in FIELDS] + [SLOW_RANK_KEY, SLOWDOWN_KEY]
    health += [f"system/{node}/cpu_utilization_percentage", time_key("step"), GOODPUT]
    keys = ["loss", "val_loss", "lr", "grad_norm", *health]
    assert run_page_tab(keys, "model") == ["Model metrics"]  # a 2-worker run's page: the model's charts alone
    assert run_page_tab(keys, "system") == [
        f"system/{node}",
        "system/rank/0",
        "system/rank/1",
        "system/stragglers",
        "System metrics",
    ]
    # (the experiment's chart view, with no tabs, draws any nested system/<x>/ section above the
    # model's charts, MLflow's own per-node keys too: mlflow_sections(keys)[0] == f"system/{node}")


def test_ratio_metrics_use_up_the_pair_and_counts_have_their_own_names():
    # a multimodal micro-batch's metrics, as the base eval_step prefixes them with val_
    step = {
        "loss/text_sum": 12.0,
        "loss/text_count": 4.0,
        "loss/audio_sum": 0.0,
        "loss/audio_count": 0.0,
        "supervised/text": 4.0,
        "supervised/audio": 0.0,
        "rows/text_lm": 4.0,
    }
    out = ratio_metrics({"val_loss": 3.5, **{f"val_{k}": v for k, v in step.items()}})
    assert out == {
        "val_loss": 3.5,
        "val_loss/text": 3.0,
        "val_supervised/text": 4.0,
        "val_supervised/audio": 0.0,
        "val_rows/text_lm": 4.0,
    }
    assert [k for k in out if is_count(k)] == ["val_supervised/text", "val_supervised/audio", "val_rows/text_lm"]
    assert not is_count("val_loss/text") and not is_count("loss") and COUNT_PREFIXES == ("rows/", "supervised/")


class _Reporter:
    rank = 0

    def __init__(self) -> None:
        self.lines: List[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)


def test_the_eval_line_shows_the_models_metrics_only(monkeypatch):
    metrics: Dict[str, float] = {
        "val_loss": 3.5,
        "val_loss/text": 3.0,
        "val_loss/audio": 4.25,
        "val_supervised/text": 6.5,
        "val_rows/text_lm": 4.0,
        "val_ppl": 33.1,
    }
    ev = object.__new__(Evaluator)
    monkeypatch.setattr(ev, "metrics", lambda engines: dict(metrics), raising=False)
    monkeypatch.setattr(ev, "artifacts", lambda engines, step, reporter: None, raising=False)
    rep = _Reporter()
    assert ev.run({}, 10, rep) == metrics  # every metric still goes to the trackers
    assert rep.lines == ["eval step 10: val_loss 3.5000  val_loss/text 3.0000  val_loss/audio 4.2500  val_ppl 33.1000"]
