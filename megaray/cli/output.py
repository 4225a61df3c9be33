"""What a command prints: a summary for people by default, one JSON document with ``--json``.

Every command with a result (``prepare ...``, ``eval``, ``generate``, ``vocode``, ``sample``,
``export``, ``config``) takes the same ``--json`` flag (:data:`JSON_OPTION`). With it, stdout holds
that one JSON document and nothing else, so ``json.loads`` or ``jq`` reads it whole; whatever the
command prints on the way (the prepare summary, notices) goes to stderr (:func:`json_stdout`).
Without it, stdout is for people: the summary, or the result as aligned ``key  value`` lines
(:func:`describe`).

    with json_stdout(as_json):          # the work; its prints go to stderr under --json
        result = do_the_work()
    emit(result, as_json)               # JSON, or the key/value lines
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator, Mapping, Optional

import typer

#: ``--json`` of every command that has a result to print
JSON_OPTION = typer.Option(
    False,
    "--json",
    help="print the result as one JSON document on stdout and nothing else there (for json.loads or jq); "
    "the human summary goes to stderr",
)


@contextlib.contextmanager
def json_stdout(as_json: bool) -> Iterator[None]:
    """While the command works: under ``--json`` everything written to stdout (``print`` in the
    data and inference layers, ``typer.echo``) goes to stderr, so that stdout carries only the
    JSON that :func:`emit` writes afterwards. Without ``--json``, nothing changes."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(result: Any, as_json: bool, human: Optional[str] = None) -> None:
    """The command's result on stdout: ``json.dumps(result)`` (indented; paths and other objects
    as strings) under ``--json``, else ``human`` when given, else :func:`describe` of a mapping."""
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    elif human is not None:
        typer.echo(human)
    elif isinstance(result, Mapping):
        typer.echo(describe(result))
    else:
        typer.echo(str(result))


def describe(result: Mapping[str, Any]) -> str:
    """A flat result as aligned ``key  value`` lines (floats to 6 significant digits, lists
    comma-separated, nested mappings as compact JSON); ``None`` values are left out."""
    items = [(str(k), v) for k, v in result.items() if v is not None]
    width = max((len(k) for k, _ in items), default=0)
    lines = []
    for key, value in items:
        if isinstance(value, float):
            text = f"{value:.6g}"
        elif isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
