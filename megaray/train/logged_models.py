"""Every checkpoint an MLflow ``LoggedModel``; the best one registered.

MLflow 3 tracks models as LoggedModels: entities of an experiment with tags, params and metrics
of their own (linked by ``model_id``), found with ``mlflow.search_logged_models``. Rank 0 makes
one per checkpoint once its copy is on storage (:class:`CheckpointModels`, the
:class:`~megaray.train.checkpoint.Checkpointer`'s ``on_saved`` hook), so "the best checkpoint of
this run, or of the whole experiment" is a query::

    mlflow.search_logged_models(experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'",
                                order_by=[{"field_name": "metrics.val_loss", "ascending": True}],
                                max_results=1, output_format="list")

A LoggedModel holds no weights: they stay where the checkpoint lies, named by the tag
``megaray.checkpoint`` (the model is marked external, ``mlflow.model.isExternal``; MLflow 3.17
has no field for an outside artifact location, and its own ``artifact_location`` stays empty).
Every command that takes ``--checkpoint`` resolves ``models:/<model_id>`` through that tag
(:func:`megaray.weights.model_checkpoint`). At the end of a run :func:`register_best` registers
the best one as a new version of ``tracking.register_model``.

Cost per checkpoint: four MLflow calls (create with tags and params, the step's metrics again
with ``model_id``, the run's model output, finalize), about 10-30 ms on SQLite. A failure is a
warning: tracking never stops training.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Tuple

from megaray import fs
from megaray.weights import CHECKPOINT_TAG, STATE_FILE, STEP_TAG

log = logging.getLogger("megaray.tracking")

#: ``model_type`` of a checkpoint's LoggedModel (search with ``model_type = 'megaray-checkpoint'``)
MODEL_TYPE = "megaray-checkpoint"
FAMILY_TAG = "megaray.family"
RUN_NAME_TAG = "megaray.run"
#: MLflow's marker of a model whose artifacts live outside MLflow (mlflow.utils.mlflow_tags)
EXTERNAL_TAG = "mlflow.model.isExternal"


def model_name(run_name: str, step: int) -> str:
    """The LoggedModel name of the checkpoint at ``step``: ``<run name>-step_00000100``."""
    from megaray.train.checkpoint import checkpoint_dir_name

    return f"{run_name}-{checkpoint_dir_name(step)}"


class CheckpointModels:
    """Rank 0's hook ``(step, location, report)``: one LoggedModel per checkpoint.

    Args:
        logger: the run's rank-0 :class:`~megaray.train.mlflow.RunLogger` (enabled).
        run_name: ``cfg.name``.
        family, preset: ``cfg.model.family`` / ``cfg.model.preset`` (tag and params).

    The model (name :func:`model_name`, ``source_run_id`` the run, ``model_type``
    :data:`MODEL_TYPE`) carries the tags ``megaray.checkpoint`` (the location), ``megaray.step``,
    ``megaray.family``, ``megaray.run``; the step's report (train metrics when logged at that
    step, ``val_*`` when evaluated, tokens, epoch) is linked to it with ``model_id`` at the same
    timestamp as the run's own points (the run's history keeps one point each).
    """

    def __init__(self, logger: Any, run_name: str, family: str, preset: Optional[str] = None):
        self.logger, self.run_name, self.family, self.preset = logger, run_name, family, preset
        self._experiment: Optional[str] = None
        self.model_ids: list = []  # made by this worker, in order

    def __call__(self, step: int, location: str, report: Mapping[str, Any]) -> Optional[str]:
        """Register the checkpoint of ``step`` at ``location``; returns the model id (None on failure)."""
        try:
            return self._log(step, location, report)
        except Exception as e:  # tracking never stops training
            log.warning(
                "MLflow: checkpoint %s not registered as a LoggedModel (%s: %s)",
                location,
                type(e).__name__,
                str(e)[:300],
            )
            return None

    def _log(self, step: int, location: str, report: Mapping[str, Any]) -> str:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client, run_id = self.logger._client, self.logger.run_id
        if self._experiment is None:
            self._experiment = client.get_run(run_id).info.experiment_id
        tags = {
            CHECKPOINT_TAG: location,
            STEP_TAG: str(step),
            FAMILY_TAG: self.family,
            RUN_NAME_TAG: self.run_name,
            EXTERNAL_TAG: "true",
        }
        params = {"checkpoint": location, "step": str(step), "family": self.family}
        if self.preset:
            params["preset"] = self.preset
        model = client.create_logged_model(
            self._experiment,
            name=model_name(self.run_name, step),
            source_run_id=run_id,
            tags=tags,
            params=params,
            model_type=MODEL_TYPE,
        )
        self.logger.metrics({k: v for k, v in report.items() if k != "step"}, step, model_id=model.model_id)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.model_ids.append(model.model_id)
        return model.model_id


def parse_metric(spec: str) -> Tuple[str, bool]:
    """``tracking.register_metric`` -> ``(metric, ascending)``: ``val_loss`` or ``min:val_loss``
    is minimised, ``max:hellaswag_acc`` maximised."""
    direction, sep, name = spec.partition(":")
    if sep and direction in ("min", "max"):
        return name, direction == "min"
    return spec, True


def best_model(uri: str, run_id: str, metric: str = "val_loss", ascending: bool = True) -> Optional[Any]:
    """The best LoggedModel of run ``run_id`` by ``metric`` whose checkpoint still exists, or None.

    Candidates: the run's LoggedModels with a ``megaray.checkpoint`` tag, ordered by
    ``mlflow.search_logged_models`` on ``metrics.<metric>``; models without the metric come last,
    newest step first among them. A model whose checkpoint is gone (``scaling.num_to_keep``) is
    skipped.
    """
    from mlflow.entities import LoggedModelStatus

    from megaray.train import mlflow as tracking

    c = tracking.client(uri)
    exp = c.get_run(run_id).info.experiment_id
    order = [{"field_name": f"metrics.{metric}", "ascending": ascending}]
    models, token = [], None
    while True:
        page = c.search_logged_models(
            [exp], filter_string=f"source_run_id = '{run_id}'", order_by=order, max_results=100, page_token=token
        )
        models.extend(m for m in page if m.tags.get(CHECKPOINT_TAG) and m.status == LoggedModelStatus.READY)
        token = page.token
        if not token:
            break
    scored = [m for m in models if any(x.key == metric for x in m.metrics or [])]
    unscored = sorted((m for m in models if m not in scored), key=lambda m: -int(m.tags.get(STEP_TAG, "0") or 0))
    for m in scored + unscored:
        if fs.exists(fs.join(m.tags[CHECKPOINT_TAG], STATE_FILE)):
            return m
        log.info("MLflow: %s skipped: its checkpoint %s is gone", m.name, m.tags[CHECKPOINT_TAG])
    return None


def register_best(uri: str, run_id: str, name: str, metric_spec: str = "val_loss") -> Optional[Any]:
    """Register the run's best checkpoint (:func:`best_model` by ``metric_spec``, see
    :func:`parse_metric`) as a new version of ``name`` in the Model Registry, source
    ``models:/<model_id>``, tagged with the metric, its value, the step and the checkpoint.
    A version of ``name`` with that source already (a re-run of a finished run) is returned as it is.
    Returns the ``ModelVersion``, or None (a warning says why: no checkpoint model, or MLflow failed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from megaray.train import mlflow as tracking

    metric, ascending = parse_metric(metric_spec)
    try:
        best = best_model(uri, run_id, metric, ascending)
        if best is None:
            log.warning(
                "MLflow: nothing registered as %r: run %s has no LoggedModel of an existing checkpoint", name, run_id
            )
            return None
        values = [x for x in best.metrics or [] if x.key == metric]
        value = values[-1].value if values else None
        if value is None:
            log.warning(
                "MLflow: no checkpoint of run %s has metric %r (tracking.register_metric); registering the "
                "newest one, %s",
                run_id,
                metric,
                best.name,
            )
        c = tracking.client(uri)
        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
            # a re-run of a finished run (or a resumed one whose best did not change) adds no new version
            same = [v for v in c.search_model_versions(f"name = '{name}'") if v.source == best.model_uri]
            if same:
                log.info("MLflow: %s is already version %s of %s", best.name, same[0].version, name)
                return same[0]
        tags = {
            "megaray.metric": metric_spec,
            CHECKPOINT_TAG: best.tags[CHECKPOINT_TAG],
            STEP_TAG: best.tags.get(STEP_TAG, ""),
        }
        if value is not None:
            tags["megaray.metric_value"] = repr(value)
        way = "min" if ascending else "max"
        why = f"{metric} ({way}) = {value:.6g}" if value is not None else f"no {metric}: newest"
        # a SQL registry looks the source model up at the *global* tracking URI (an MLflow TODO in
        # SqlAlchemyStore.create_model_version): point it at this run's for the call
        with _use_tracking_uri(uri):
            version = c.create_model_version(
                name,
                source=best.model_uri,
                run_id=run_id,
                tags=tags,
                model_id=best.model_id,
                description=f"{best.name}: best checkpoint of its run by {why}",
            )
        log.info("MLflow: registered %s as %s version %s (%s)", best.name, name, version.version, why)
        return version
    except Exception as e:  # the run itself succeeded: say so and go on
        log.warning(
            "MLflow: the best checkpoint was not registered as %r (%s: %s)", name, type(e).__name__, str(e)[:300]
        )
        return None
