"""Up-front checks of command-line options, run while Typer parses them (before any command body,
so before Ray or torch start).

Each check is a Typer ``callback``: ``typer.Option(300, callback=at_least(1))``. A bad value raises
:class:`~megaray.errors.ConfigError` naming the option and the value
(``--top-p must be in (0, 1], got 1.5``), which the app prints as ``error: ...`` (exit 2). Missing
input files raise :class:`~megaray.errors.DataError` naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from megaray.errors import ConfigError, DataError

#: Help text of the repeatable ``--set`` option of run commands.
SET_HELP = "Dotted override KEY=VALUE, repeatable: --set model.n_layer=4 --set train.lr=3e-4"


def _flag(param: typer.CallbackParam) -> str:
    """The option as the user typed it (``--top-p``), longest spelling first."""
    return max(param.opts, key=len) if param.opts else str(param.name)


def at_least(low: float) -> Callable[..., Any]:
    """Callback: the value (when given) must be ``>= low``. Counts and sizes use ``at_least(1)``."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and value < low:
            raise ConfigError(f"{_flag(param)} must be >= {low}, got {value}")
        return value

    return check


def in_interval(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[..., Any]:
    """Callback: the value (when given) must lie in the interval, written as in the message
    (``in_interval(0, 1, low_open=True, high_open=False)`` is ``(0, 1]``)."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ConfigError(f"{_flag(param)} must be in {text}, got {value:g}")
        return value

    return check


def one_of(choices: Sequence[str]) -> Callable[..., Any]:
    """Callback: the value must be one of ``choices`` (did-you-mean from :func:`megaray.config.suggest`)."""

    def check(param: typer.CallbackParam, value: str) -> str:
        from megaray.config import suggest

        if value not in choices:
            raise ConfigError(
                f"{_flag(param)} must be one of {', '.join(choices)}, got {value!r}{suggest(value, choices)}"
            )
        return value

    return check


def input_file(param: typer.CallbackParam, value: Any) -> Any:
    """Callback: a local input file must exist (``s3://``/``gs://`` URIs are checked where read)."""
    if value is not None and "://" not in str(value) and not Path(value).is_file():
        raise DataError(f"{_flag(param)}: file not found: {value}")
    return value


def require_local_sources(sources: Sequence[str], keywords: Sequence[str] = (), hf: bool = False) -> None:
    """Every local source path must exist; ``keywords`` (``stdlib``, ``espeak``) and URIs pass;
    with ``hf`` (commands that read Hugging Face datasets), ``hf:`` sources are parsed and their
    local folder checked (:func:`megaray.data.hf.check_hf_source`).

    Raises:
        DataError: names the first missing source, or the ``hf:`` source that does not parse.
    """
    for src in sources:
        if hf and src.startswith("hf:"):
            from megaray.data.hf import check_hf_source

            check_hf_source(src)
            continue
        if src in keywords or "://" in src or any(c in src for c in "*?["):
            continue
        if not os.path.exists(src):
            kinds = "a folder, file, glob, s3:// gs:// URI" + (" or hf: dataset" if hf else "")
            raise DataError(
                f"source not found: {src} ({kinds}" + (f"; or one of: {', '.join(keywords)})" if keywords else ")")
            )


def use_tracking_uri(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """Callback of ``--tracking-uri``: the given MLflow tracking URI becomes this process's
    ``MLFLOW_TRACKING_URI``, where ``models:/`` checkpoints are looked up
    (:func:`megaray.weights.model_checkpoint`) and what MLflow logging defaults to."""
    if value:
        os.environ["MLFLOW_TRACKING_URI"] = value
    return value


#: help of ``--tracking-uri`` on the commands that take ``--checkpoint``
TRACKING_URI_HELP = (
    "MLflow tracking URI where models:/ checkpoints are looked up (default $MLFLOW_TRACKING_URI, "
    "else sqlite:///mlflow.db here)"
)
