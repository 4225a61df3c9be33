"""MLflow glue: one MLflow run per megaray run, found again on resume, logged from rank 0.

The driver calls :func:`start_run` before ``TorchTrainer.fit``; it creates the MLflow run (or
finds the one a previous attempt of the same run made, by the ``megaray.run_key`` tag) and hands
its id to the workers. Rank 0 logs through :class:`RunLogger`. Everything goes through
``MlflowClient`` with an explicit run id, so nothing depends on MLflow's global active run and
Tune trials can log nested child runs side by side.

What a complete run holds besides params and metrics: the command line (the run description,
:func:`command_line`), the prepared data as MLflow dataset inputs (:func:`log_datasets`), system
metrics sampled on every node, keyed by node (:meth:`RunLogger.start_system_metrics`,
:func:`node_name`), every checkpoint as an MLflow LoggedModel with its step's metrics, the best one
optionally registered (:mod:`megaray.train.logged_models`), and the final model as an MLflow ``pyfunc`` model
(:func:`megaray.train.mlflow_model.log_model`).
Only :mod:`megaray.train.mlflow_model` imports MLflow at import time: a run with tracking off
needs no MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional

log = logging.getLogger("megaray.tracking")

RUN_KEY_TAG = "megaray.run_key"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run description shown in the MLflow UI
#: manifest fields that change on every prepare without changing the data (left out of digests)
_VOLATILE = ("created", "seconds")


def client(uri: str):
    """An ``MlflowClient`` for ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created when missing. For local stores (``sqlite:``, paths)
    artifacts go to ``./mlartifacts`` beside the database."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri[len("sqlite:///") :]).resolve().parent.joinpath("mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def start_run(
    uri: str,
    experiment: str,
    run_key: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Optional[Mapping[str, str]] = None,
    parent_run_id: Optional[str] = None,
) -> str:
    """Create, or find and reopen, the MLflow run for ``run_key``; returns its run id.

    ``run_key`` identifies a megaray run across restarts (storage path + run name); a resumed
    run continues the same MLflow run instead of creating a duplicate. Params are logged once
    (MLflow params are immutable); a resumed run whose config changed logs the new values as
    tags ``resume.<key>`` instead.
    """
    from mlflow.entities import Param, RunTag

    c = client(uri)
    exp = experiment_id(uri, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        old = found[0].data.params
        changed = {k: v for k, v in params.items() if k in old and old[k] != _str(v)}
        new = {k: v for k, v in params.items() if k not in old}
        if new:
            c.log_batch(run_id, params=[Param(k, _str(v)) for k, v in new.items()])
        if changed:
            c.log_batch(run_id, tags=[RunTag(f"resume.{k}", _str(v)) for k, v in changed.items()])
        log.info("MLflow: resuming run %s (%s)", run_name, run_id)
        return run_id
    all_tags = {RUN_KEY_TAG: run_key, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(exp, run_name=run_name, tags=all_tags)
    items = [Param(k, _str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command that started this process (``sys.argv``, shell-quoted), for the run description."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("/megaray", "/megaray.exe")):
        argv[0] = "megaray"
    return " ".join(shlex.quote(a) for a in argv)


def manifest_digest(manifest: Mapping[str, Any], split: Optional[str] = None) -> str:
    """Content hash of a prepared folder's manifest (16 hex digits of SHA-256 over its canonical
    JSON, without the ``created`` and ``seconds`` fields), or of one split's entry (its shard
    list: paths, rows, tokens, bytes). Equal manifests give equal digests across machines."""
    if split is not None:
        content: Any = manifest["splits"][split]
    else:
        content = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_datasets(uri: str, run_id: str, folders: Mapping[str, Mapping[str, Any]]) -> None:
    """Log each prepared folder's splits as MLflow dataset inputs of the run.

    ``folders``: ``{folder path or URI: its manifest}``. Each split becomes a dataset named
    ``<folder name>/<split>`` with :func:`manifest_digest` of that split, the folder as source,
    and the input context ``training`` (split ``train``) or ``validation`` (``val``); a manifest
    without splits is one ``training`` dataset digested whole.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    contexts = {"train": "training", "val": "validation"}
    inputs = []
    for folder, manifest in folders.items():
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(folder))
        base = str(folder).rstrip("/").rsplit("/", 1)[-1]
        splits = [s for s in manifest.get("splits", {}) if s in contexts] or [None]
        for split in splits:
            ds = MetaDataset(source, name=f"{base}/{split}" if split else base, digest=manifest_digest(manifest, split))
            tag = InputTag(MLFLOW_DATASET_CONTEXT, contexts.get(split, "training"))
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[tag]))
    if inputs:
        client(uri).log_inputs(run_id, datasets=inputs)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    client(uri).set_terminated(run_id, status=status)


def run_url(uri: str, run_id: str) -> str:
    """Where to look at the run: the UI address for http servers, else the ``mlflow ui`` command."""
    c = client(uri)
    exp = c.get_run(run_id).info.experiment_id
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  ->  experiment {exp}, run {run_id}"


class RunLogger:
    """Rank-0 logger for one MLflow run (no-op when ``run_id`` is None).

    Args:
        uri: tracking URI.
        run_id: the run to log into (from :func:`start_run`).
    """

    def __init__(self, uri: Optional[str], run_id: Optional[str]):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri) if (uri and run_id) else None
        self._stamps: dict = {}  # step -> ms timestamp of the last steps logged (see metrics)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def metrics(self, values: Mapping[str, float], step: int, model_id: Optional[str] = None) -> None:
        """Log numeric metrics at optimizer step ``step`` (non-finite values are skipped).

        ``model_id``: link them to that LoggedModel too (:mod:`megaray.train.logged_models`); values
        logged again at one of the last 16 steps logged keep that call's timestamp, so MLflow drops
        the exact duplicates from the run's history and only the model's link is new."""
        if not self.enabled:
            return
        import math
        import time

        from mlflow.entities import Metric

        stamps = self._stamps
        now = stamps.get(step) if model_id is not None else None
        if now is None:
            now = stamps[step] = int(time.time() * 1000)
            for old in sorted(stamps)[:-16]:
                del stamps[old]
        ms = [
            Metric(k, float(v), now, step, model_id=model_id)
            for k, v in values.items()
            if v is not None and math.isfinite(float(v))
        ]
        if ms:
            self._client.log_batch(self.run_id, metrics=ms)

    def artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory."""
        if not self.enabled:
            return
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as artifact ``artifact_file`` (e.g. ``samples/step_00000100.txt``)."""
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._client.set_tag(self.run_id, key, value)

    def start_system_metrics(self, interval_s: float, node_id: Optional[str] = None) -> None:
        """Sample CPU, memory, disk, network and (with ``nvidia-ml-py`` installed) GPU utilisation
        and memory of this node every ``interval_s`` seconds into ``system/<node_id>/...`` metrics
        (``system/...`` without a ``node_id``), in a daemon thread (MLflow's
        ``SystemMetricsMonitor``, its ``node_id`` argument) that stops by itself once the run is no
        longer RUNNING. Call it on one worker per node; ``interval_s <= 0`` or tracking off:
        nothing. A resumed run continues the step count."""
        if not self.enabled or interval_s <= 0 or getattr(self, "_monitor", None) is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id, tracking_uri=self.uri
        )
        self._monitor.start()


def node_name(host: str, ray_node_id: str) -> str:
    """The name a node's system metrics are keyed by (MLflow's ``node_id``: ``system/<name>/...``)
    and the straggler warning names: ``<host>-<first 8 hex digits of its Ray node id>``, stable for
    the machine and unique even where host names repeat (containers)."""
    return f"{host}-{ray_node_id[:8]}"


def _str(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."
