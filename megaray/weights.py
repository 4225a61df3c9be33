"""Trained weights on disk, the read side: find a complete checkpoint, rebuild its network.

The layout is written by :mod:`megaray.train.checkpoint` (which re-exports these names); this
module sits below ``tasks`` so that a task can load a frozen network from another run (a VAE
that decodes latents, a vocoder, a text encoder) and ``inference`` can load a trained one,
without importing the training layer. A checkpoint directory holds ``config.yaml`` (the resolved
run config), ``model.pt`` (consolidated weights), ``ema.pt`` (EMA weights, when kept) and
``megaray.json`` (written last: its presence marks the directory complete).

Every command that takes a checkpoint also takes an MLflow model URI (:func:`resolve`):
``models:/<model_id>`` (the LoggedModel a run registers for each checkpoint,
:mod:`megaray.train.logged_models`), ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
(a Model Registry version); the LoggedModel's ``megaray.checkpoint`` tag says where the checkpoint lies.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megaray.config import RunConfig
from megaray.errors import CheckpointError
from megaray.families import load_config

STATE_FILE = "megaray.json"
WEIGHTS_FILE = "model.pt"
EMA_FILE = "ema.pt"
#: what ``torch.load`` raises on a truncated or overwritten file
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load(path)``; a truncated or corrupt file raises CheckpointError naming it."""
    try:
        return torch.load(path, **kwargs)
    except _UNREADABLE as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
            "resume from an earlier step_* checkpoint or retrain"
        ) from None


def resolve(path: str | os.PathLike, tracking_uri: Optional[str] = None) -> Path:
    """A complete checkpoint directory from ``path``: the directory itself, the latest complete
    ``step_*`` checkpoint below a run directory, or the checkpoint an MLflow model URI stands for
    (``models:/...``: :func:`model_checkpoint`, looked up at ``tracking_uri``).

    Raises:
        CheckpointError: nothing complete there; the message says what was looked for.
    """
    if is_model_uri(path):
        path = model_checkpoint(str(path), tracking_uri)
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    if not p.exists():
        raise CheckpointError(
            f"checkpoint not found: {p} does not exist (pass a run directory such as runs/<name> or one of its step_* folders)"
        )
    found = sorted(d for d in p.glob("**/step_*") if (d / STATE_FILE).is_file())
    if not found:
        raise CheckpointError(
            f"no complete checkpoint under {p} (looked for step_*/{STATE_FILE}); has the run saved one yet?"
        )
    return max(found, key=lambda d: json.loads((d / STATE_FILE).read_text())["step"])


MODEL_URI_PREFIX = "models:/"
#: LoggedModel tag: where the model's checkpoint lies (a directory or an s3:// / gs:// URI)
CHECKPOINT_TAG = "megaray.checkpoint"
#: LoggedModel tag: the optimizer step of that checkpoint
STEP_TAG = "megaray.step"


def is_model_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an MLflow model URI (``models:/...``) rather than a directory."""
    return str(path).startswith(MODEL_URI_PREFIX)


def default_tracking_uri() -> str:
    """The tracking URI a run logs to by default: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory (``tracking.tracking_uri`` unset)."""
    from megaray.config import TrackingConfig

    return TrackingConfig().resolved_uri()


def model_checkpoint(uri: str, tracking_uri: Optional[str] = None) -> str:
    """The checkpoint location an MLflow model URI stands for, through the MLflow client at
    ``tracking_uri`` (default :func:`default_tracking_uri`).

    ``uri``: ``models:/<model_id>`` (a LoggedModel: megaray registers one per checkpoint and
    tags the run's final ``pyfunc`` model likewise), ``models:/<name>/<version>``,
    ``models:/<name>/latest`` or ``models:/<name>@<alias>`` (a Model Registry version, whose
    source is such a LoggedModel). Answers are cached for the process.

    Raises:
        CheckpointError: a malformed URI, no such model or version at ``tracking_uri``, a model
            that is not a megaray checkpoint, or a checkpoint that is gone or not local; the
            message names the URI, the tracking URI and what to do.
    """
    return _model_checkpoint(uri, tracking_uri or default_tracking_uri())


@functools.lru_cache(maxsize=32)
def _model_checkpoint(uri: str, tracking_uri: str) -> str:
    where = (
        f"(tracking URI {tracking_uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI if the model lives elsewhere)"
    )
    body = uri[len(MODEL_URI_PREFIX) :].strip("/")
    forms = "models:/<model_id>, models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
    if not body:
        raise CheckpointError(f"{uri}: no model named; use {forms}")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        raise CheckpointError(f"{uri}: no MLflow database at {tracking_uri[len('sqlite:///') :]} {where}")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    model_id = body
    try:
        if "@" in body or "/" in body:  # a Model Registry version
            name, sep, ref = body.partition("@") if "@" in body else body.rpartition("/")
            if not name or not ref:
                raise CheckpointError(f"{uri}: malformed; use {forms}")
            if sep == "@":
                version = client.get_model_version_by_alias(name, ref)
            elif ref == "latest":
                found = client.search_model_versions(f"name = '{name}'")
                if not found:
                    raise CheckpointError(f"{uri}: registered model {name!r} has no versions {where}")
                version = max(found, key=lambda v: int(v.version))
            elif ref.isdigit():
                version = client.get_model_version(name, ref)
            else:
                raise CheckpointError(
                    f"{uri}: {ref!r} is neither a version number, 'latest' nor an alias "
                    f"(models:/{name}@{ref}); use {forms}"
                )
            model_id = version.model_id or (
                version.source[len(MODEL_URI_PREFIX) :].strip("/") if is_model_uri(version.source) else None
            )
            if not model_id:
                raise CheckpointError(
                    f"{uri}: version {version.version} of {name!r} was registered from "
                    f"{version.source}, not from a megaray LoggedModel; load it with MLflow "
                    "(mlflow.pyfunc.load_model) or pass its checkpoint directory"
                )
        model = client.get_logged_model(model_id)
    except MlflowException as e:
        raise CheckpointError(f"{uri}: not found {where}: {e.message}") from None
    location = model.tags.get(CHECKPOINT_TAG)
    if not location:
        raise CheckpointError(
            f"{uri}: LoggedModel {model.model_id} ({model.name}) is not a megaray checkpoint (no "
            f"{CHECKPOINT_TAG} tag); pass a checkpoint directory or a model a megaray run logged"
        )
    if "://" in location and not location.startswith("file://"):
        raise CheckpointError(
            f"{uri}: its checkpoint lies at {location}; this command reads local checkpoints: copy "
            "that folder to this machine and pass its path"
        )
    location = location.removeprefix("file://")
    if not Path(location, STATE_FILE).is_file():
        raise CheckpointError(
            f"{uri}: LoggedModel {model.model_id} ({model.name}) points at {location}, which is "
            "no complete checkpoint any more (scaling.num_to_keep keeps only the newest ones); pick "
            "another model (mlflow.search_logged_models, or the MLflow UI's Models tab)"
        )
    return location


def load_for_inference(path: str | os.PathLike, device: str = "cpu") -> Tuple[torch.nn.Module, RunConfig, Path]:
    """Rebuild the trained model from a checkpoint for generation, evaluation or vocoding.

    The EMA weights (``ema.pt``) when the run kept them (``train.ema_decay``), else the
    consolidated weights (``model.pt``). Returns ``(model in eval mode, resolved run config,
    checkpoint directory)``.

    Raises:
        CheckpointError: no complete checkpoint, no weights in it, or a truncated/corrupt weights
            file (``<checkpoint>/model.pt is truncated or corrupt (...)``).
    """
    from megaray import families

    ckpt = resolve(path)
    cfg = load_config(ckpt / "config.yaml")
    weights = ckpt / (EMA_FILE if (ckpt / EMA_FILE).is_file() else WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE} (consolidated weights) in this checkpoint")
    model = families.build_model(cfg.model)
    sd = torch_load(weights, map_location=device, weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), cfg, ckpt


def read_state(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The megaray state of the latest complete checkpoint under ``path``, or None."""
    try:
        return json.loads((resolve(path) / STATE_FILE).read_text())
    except CheckpointError:
        return None
