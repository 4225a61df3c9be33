"""The final checkpoint as an MLflow ``pyfunc`` model (what MLflow users load, serve and register).

:func:`log_model` (called by :func:`megaray.train.launch.fit` at the end of a run) logs a
:class:`CheckpointModel` into the run: the checkpoint's config, state, weights and the files the
family's :meth:`~megaray.tasks.base.Task.mlflow_model` spec names; an LM's model generates text.
Loading it back needs megaray and torch importable::

    model = mlflow.pyfunc.load_model(run.data.tags["megaray.model_uri"])
    model.predict(pd.DataFrame({"prompt": ["The "]}), params={"max_new_tokens": 32, "temperature": 0.8})
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlflow
import mlflow.pyfunc
import pandas as pd

from megaray.train import mlflow as tracking

log = logging.getLogger("megaray.tracking")

MODEL_URI_TAG = "megaray.model_uri"


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """The MLflow ``pyfunc`` model of a megaray checkpoint: rebuilds the network with
    :func:`~megaray.train.checkpoint.load_for_inference` (EMA weights when present) and answers
    with the family's :meth:`~megaray.tasks.base.Task.predict` (an LM: prompt -> prompt + text).

    Input: a DataFrame with the spec's input column (``prompt`` for LMs), or a list. Params: the
    spec's (``max_new_tokens``, ``temperature``, ``top_k`` for LMs). Loading needs megaray and
    torch importable (the model's code is this package).
    """

    def load_context(self, context: Any) -> None:
        from megaray import families
        from megaray.train.checkpoint import load_for_inference

        self.model, cfg, ckpt = load_for_inference(context.artifacts["checkpoint"])
        self.task = families.task_class(cfg.model.family, cfg.train.task)(cfg)
        self.spec = self.task.mlflow_model()
        self.files = {name: str(ckpt / name) for name in self.spec["files"]}

    def predict(self, context: Any, model_input: pd.DataFrame, params: Optional[Dict[str, Any]] = None) -> List[Any]:
        """One output per input row: ``self.task.predict`` with the spec's params, overridden by ``params``."""
        column = self.spec["input"]
        if hasattr(model_input, "columns"):
            inputs = list(model_input[column] if column in model_input.columns else model_input.iloc[:, 0])
        else:
            inputs = [model_input] if isinstance(model_input, str) else list(model_input)
        return self.task.predict(self.model, self.files, inputs, {**self.spec["params"], **(params or {})})


def log_model(uri: str, run_id: str, task: Any, checkpoint: str, register_as: Optional[str] = None) -> Optional[str]:
    """Log ``checkpoint`` (a local checkpoint directory) as the run's MLflow model ``model``: a
    :class:`CheckpointModel` carrying the checkpoint's config, state, weights and the files the
    task's :meth:`~megaray.tasks.base.Task.mlflow_model` spec names. Registered as a new version of
    ``register_as`` in the Model Registry when given (a run registers its best checkpoint instead:
    :func:`megaray.train.logged_models.register_best`). The model is tagged like a checkpoint's
    LoggedModel (``megaray.checkpoint``, ``megaray.step``), so ``--checkpoint models:/<its id>``
    works too. Returns the model URI (also tagged on the run as ``megaray.model_uri``), or None
    when the family logs no model or the checkpoint is remote."""
    spec = task.mlflow_model()
    if spec is None or "://" in checkpoint:
        if spec is not None:
            log.warning("MLflow model not logged: checkpoint %s is not on a local filesystem", checkpoint)
        return None
    import tokenizers
    import torch
    from mlflow.models import ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # restores the caller's URI afterwards
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from megaray.train.checkpoint import EMA_FILE, STATE_FILE, WEIGHTS_FILE
    from megaray.weights import CHECKPOINT_TAG, STEP_TAG

    kinds = {bool: "boolean", int: "long", float: "double", str: "string"}
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in spec["params"].items()]),
    )
    ckpt = Path(checkpoint)
    names = ["config.yaml", STATE_FILE, WEIGHTS_FILE, EMA_FILE, *spec["files"]]

    with tempfile.TemporaryDirectory() as tmp:
        try:  # MLflow's log_model reads the working directory (uv project detection)
            os.getcwd()
        except FileNotFoundError:
            # it can vanish under a `ray job submit` driver: the job's working_dir package is
            # garbage-collected by a node's runtime-env agent once its Train workers are gone
            # (seen on the fake multi-node cluster, whose nodes share one session directory)
            os.chdir(tempfile.gettempdir())
        staged = Path(tmp) / "checkpoint"
        staged.mkdir()
        for name in names:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, staged / name)
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # the signature is explicit; an input example would make MLflow load and run the model here
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            # CheckpointModel is megaray's own class, pickled by design (its weights are files)
            pyfunc_log = logging.getLogger("mlflow.pyfunc")
            level = pyfunc_log.level
            pyfunc_log.setLevel(logging.ERROR)
            try:
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=CheckpointModel(),
                    artifacts={"checkpoint": str(staged)},
                    signature=signature,
                    registered_model_name=register_as,
                    pip_requirements=[
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"tokenizers=={tokenizers.__version__}",
                        f"mlflow=={mlflow.__version__}",
                    ],
                )
            finally:
                pyfunc_log.setLevel(level)
    c = tracking.client(uri)
    c.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    step = json.loads((ckpt / STATE_FILE).read_text()).get("step", "") if (ckpt / STATE_FILE).is_file() else ""
    c.set_logged_model_tags(info.model_id, {CHECKPOINT_TAG: str(ckpt), STEP_TAG: str(step)})
    return info.model_uri
