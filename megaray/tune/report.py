"""What a search leaves behind: one :class:`TrialSummary` per trial, the :class:`SearchResult`, and
its table, CSV and curve plot (printed at the end, logged to the MLflow parent run)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from megaray.config import ConfigError
from megaray.tune.config import TuneSearch, trial_run_name

# Stand-in for a NaN/inf search metric: Tune's schedulers compare numbers, and a diverged trial
# must rank last (ASHA treats NaN as "no information" and would let it run on).
DIVERGED = 1e30
OUTCOMES = ("completed", "stopped_early", "error")
#: metrics of extra evaluations shown in the table and plot when trials report them
EXTRA_EVALS = ("hellaswag_acc", "hellaswag_acc_norm")


@dataclass
class TrialSummary:
    """One trial after the search.

    Attributes:
        trial_id: Tune trial id (stable across resume).
        params: the sampled values, by space key.
        outcome: ``completed`` (reached train.max_steps), ``stopped_early`` (by the scheduler),
            ``error`` or ``not_run``.
        last_step: last reported ``step``.
        metric: last reported value of the search metric (None if never reported).
        best_metric: best value reported over the trial.
        curve: ``[(step, metric)]`` of every report carrying the metric.
        val_curve: ``[(step, val_loss)]`` when the metric is not val_loss (for the plot).
        evals: ``{name: [(step, value)]}`` of the extra evaluations a trial reported
            (:data:`EXTRA_EVALS`, e.g. HellaSwag accuracy when ``eval.hellaswag`` is set).
        checkpoint: latest Train checkpoint of the trial.
        run_dir: the trial's Ray Train run directory.
        mlflow_run_id: the trial's nested MLflow run.
        error: why a failed trial failed: ``ExceptionType: first line`` of the root error.
    """

    trial_id: str
    params: Dict[str, Any]
    outcome: str
    last_step: Optional[int]
    metric: Optional[float]
    best_metric: Optional[float]
    curve: List[tuple] = field(default_factory=list)
    val_curve: List[tuple] = field(default_factory=list)
    evals: Dict[str, List[tuple]] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    run_dir: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None


@dataclass
class SearchResult:
    """What :func:`~megaray.tune.search.run_search` leaves behind.

    Attributes:
        name: search name.
        experiment_path: Tune experiment directory (pass to ``resume``).
        metric / mode: what was optimised.
        trials: every trial, in trial-id order.
        best: the trial with the best final metric (None if no trial reported it).
        parent_run_id / tracking_uri: the MLflow parent run (None when tracking is off).
        elapsed_s: wall time of this call.
    """

    name: str
    experiment_path: str
    metric: str
    mode: str
    trials: List[TrialSummary]
    best: Optional[TrialSummary]
    parent_run_id: Optional[str]
    tracking_uri: Optional[str]
    elapsed_s: float

    def counts(self) -> Dict[str, int]:
        return {o: sum(t.outcome == o for t in self.trials) for o in OUTCOMES}

    def table(self) -> str:
        """Markdown table of every trial (also logged to the parent run as ``tune/trials.md``)."""
        return markdown(self.trials, self.metric, self.best)

    def summary(self) -> str:
        """What a CLI prints at the end: counts, the best trial, where to look, the table."""
        n = self.counts()
        lines = [
            f"search {self.name}: {len(self.trials)} trials ({n['completed']} completed, "
            f"{n['stopped_early']} stopped early, {n['error']} failed) in {self.elapsed_s:.0f} s",
            f"  experiment  {self.experiment_path}",
        ]
        if self.best is not None:
            lines += [
                f"  best        trial {self.best.trial_id}: {self.metric} {fmt(self.best.metric)} "
                f"at step {self.best.last_step}",
                f"  params      {json.dumps(self.best.params, default=str)}",
                f"  checkpoint  {self.best.checkpoint}",
            ]
        if self.parent_run_id:
            from megaray.train.mlflow import run_url

            lines.append(f"  mlflow      {run_url(self.tracking_uri, self.parent_run_id)}")
            lines.append(
                f"  children    mlflow.search_runs(filter_string=\"tags.mlflow.parentRunId = '{self.parent_run_id}'\")"
            )
        return "\n".join(lines) + "\n\n" + self.table()


# ----------------------------------------------------------------------------- collecting


def summarize(search: TuneSearch, result, trial_id: str, mlflow_run_id: Optional[str]) -> TrialSummary:
    """A :class:`TrialSummary` from one ``ray.tune.Result`` (its metrics dataframe and error)."""
    metric = search.config.search.metric
    df = result.metrics_dataframe
    last_step = ckpt = None
    evals: Dict[str, List[tuple]] = {}
    curve: List[tuple] = []
    val_curve: List[tuple] = []
    if df is not None and len(df) and "step" in df:
        steps = df["step"].dropna()
        last_step = int(steps.iloc[-1]) if len(steps) else None
        curve = _series(df, metric)
        val_curve = _series(df, "val_loss") if metric != "val_loss" else []
        evals = {k: _series(df, k) for k in EXTRA_EVALS if k != metric and k in df}
        if "checkpoint_path" in df:
            c = df["checkpoint_path"].dropna()
            ckpt = str(c.iloc[-1]) if len(c) else None
    try:
        max_steps = search.trial_config(result.config or {}, trial_id).train.max_steps  # may be searched
    except ConfigError:
        max_steps = search.max_steps()
    if result.error is not None:
        outcome = "error"
    elif last_step is None:
        outcome = "not_run"
    else:
        outcome = "completed" if last_step >= max_steps else "stopped_early"
    values = [v for _, v in curve]
    better = min if search.config.search.mode == "min" else max
    return TrialSummary(
        trial_id=trial_id,
        params=search.decode(result.config or {}),
        outcome=outcome,
        last_step=last_step,
        metric=values[-1] if values else None,
        best_metric=better(values) if values else None,
        curve=curve,
        val_curve=val_curve,
        evals={k: v for k, v in evals.items() if v},
        checkpoint=ckpt,
        run_dir=f"{search.runs_path()}/{trial_run_name(trial_id)}",
        mlflow_run_id=mlflow_run_id,
        error=failure_reason(result.error) if result.error is not None else None,
    )


def failure_reason(error: BaseException) -> str:
    """``"DataError: shard folder not found: ..."``: why a trial failed, in one line.

    The error is the user's error behind Ray's wrappers when there is one
    (:func:`megaray.train.ray_compat.user_error`), else the root error
    (:func:`~megaray.train.ray_compat.root_error`); its first line is kept, with the next one
    when the first is a heading such as ``invalid config:``.
    """
    from megaray.train.ray_compat import root_error, user_error

    error = user_error(error) or root_error(error)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()] or [""]
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {first}"[:300]


def _series(df, column: str) -> List[tuple]:
    if column not in df:
        return []
    sub = df[["step", column]].dropna()
    return [(int(s), float(v)) for s, v in zip(sub["step"], sub[column])]


def best_trial(trials: List[TrialSummary], mode: str) -> Optional[TrialSummary]:
    """The trial with the best last metric; errored and diverged trials are excluded."""
    scored = [t for t in trials if t.metric is not None and t.outcome != "error" and abs(t.metric) < DIVERGED]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


# ----------------------------------------------------------------------------- formats


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "diverged" if abs(v) >= DIVERGED else f"{v:.4g}"
    if isinstance(v, dict):  # a multi-key choice: n_layer=4,n_embd=64; {} = the base config unchanged
        return ",".join(f"{k}={fmt(x)}" for k, x in v.items()) or "(base)"
    return "" if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))


def markdown(trials: List[TrialSummary], metric: str, best: Optional[TrialSummary]) -> str:
    """One row per trial; a column per extra evaluation some trial reported (its last value, e.g.
    ``hellaswag_acc_norm``); an ``error`` column when some trial failed (the reason, first line)."""
    keys = sorted({k for t in trials for k in t.params})
    evals = _eval_names(trials)
    errors = any(t.error for t in trials)
    head = ["trial", "outcome", "last step", f"{metric} (last)", f"{metric} (best)", *evals, *keys, "mlflow run"]
    head += ["error"] if errors else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        mark = " **best**" if best is not None and t.trial_id == best.trial_id else ""
        row = [
            t.trial_id + mark,
            t.outcome,
            fmt(t.last_step),
            fmt(t.metric),
            fmt(t.best_metric),
            *[fmt(_last(t, e)) for e in evals],
            *[fmt(t.params.get(k)) for k in keys],
            t.mlflow_run_id or "",
        ]
        row += [(t.error or "").replace("|", "\\|")] if errors else []
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def to_csv(trials: List[TrialSummary], metric: str) -> str:
    keys = sorted({k for t in trials for k in t.params})
    evals = _eval_names(trials)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "trial_id",
            "outcome",
            "last_step",
            f"{metric}_last",
            f"{metric}_best",
            *[f"{e}_last" for e in evals],
            *keys,
            "mlflow_run_id",
            "checkpoint",
            "error",
        ]
    )
    for t in trials:
        w.writerow(
            [
                t.trial_id,
                t.outcome,
                t.last_step,
                t.metric,
                t.best_metric,
                *[_last(t, e) for e in evals],
                *[fmt(t.params.get(k)) for k in keys],
                t.mlflow_run_id,
                t.checkpoint,
                t.error,
            ]
        )
    return buf.getvalue()


def _eval_names(trials: List[TrialSummary]) -> List[str]:
    return [e for e in EXTRA_EVALS if any(t.evals.get(e) for t in trials)]


def _last(t: TrialSummary, name: str) -> Optional[float]:
    series = t.evals.get(name)
    return series[-1][1] if series else None


def plot(result: SearchResult) -> Optional[bytes]:
    """PNG of every trial's curve of the search metric (and of val_loss when the metric is another
    one, and of ``hellaswag_acc_norm`` when trials reported it), step on x; trials stopped early
    dashed, the best one bold. None when nothing was reported."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(result.metric, lambda t: t.curve)]
    if result.metric != "val_loss" and any(t.val_curve for t in result.trials):
        panels.append(("val_loss", lambda t: t.val_curve))
    if "hellaswag_acc_norm" in _eval_names(result.trials):
        panels.append(("hellaswag_acc_norm", lambda t: t.evals.get("hellaswag_acc_norm", [])))
    if not any(get(t) for _, get in panels for t in result.trials):
        return None
    fig = Figure(figsize=(9 * len(panels), 5 + 0.17 * len(result.trials)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, get) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        curves = [(t, [(s, v) for s, v in get(t) if abs(v) < DIVERGED]) for t in result.trials]
        vals = [v for _, c in curves for _, v in c]
        for t, c in curves:
            if not c:
                continue
            label = f"{t.trial_id} " + " ".join(
                fmt(v) if isinstance(v, dict) else f"{k.split('.')[-1]}={fmt(v)}" for k, v in t.params.items()
            )
            is_best = result.best is not None and t.trial_id == result.best.trial_id
            stopped = t.outcome == "stopped_early"
            ax.plot(
                [s for s, _ in c],
                [v for _, v in c],
                marker="o",
                markersize=3,
                linestyle="--" if stopped else "-",
                linewidth=2.5 if is_best else 1.2,
                label=label[:110] + (" (best)" if is_best else "") + (" (stopped)" if stopped else ""),
            )
        if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{result.name}: {name} per trial")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_png(png: bytes, log_artifact) -> None:
    """Hand ``png`` to ``log_artifact(path)`` as ``curves.png`` (MLflow logs files, not bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "curves.png"
        p.write_bytes(png)
        log_artifact(p)
