"""The one Typer app, and the one place that turns a :class:`~megaray.errors.MegarayError` into
``error: <message>`` on stderr (red), exit status 2, no traceback.

Commands let every ``MegarayError`` propagate; :class:`MegarayGroup` catches it around the whole
invocation (option callbacks included), so ``megaray ...`` and ``typer.testing.CliRunner`` on
:data:`app` behave the same. ``MEGARAY_DEBUG=1`` prints the traceback before the error line. Any
other exception is a bug or a crash, not the user's doing: it keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import traceback

import typer
from typer.core import TyperGroup

from megaray.errors import MegarayError

#: Exit status of a user-caused error (a usage error in Click is 2 as well).
ERROR_EXIT = 2


class MegarayGroup(TyperGroup):
    """The top-level command group: runs a command and reports a ``MegarayError`` once."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except MegarayError as e:
            report_error(e)
            raise typer.Exit(ERROR_EXIT) from None


def report_error(e: MegarayError) -> None:
    """``error: <message>`` in red on stderr; the traceback first when ``MEGARAY_DEBUG=1``."""
    if os.environ.get("MEGARAY_DEBUG", "") not in ("", "0"):
        traceback.print_exception(type(e), e, e.__traceback__)
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)


app = typer.Typer(
    cls=MegarayGroup,
    help=(
        "megaray: Ray Data -> Ray Train + DeepSpeed -> MLflow training for text, audio and image models.\n\n"
        "Start with: megaray demo   (prepares the stdlib corpus, trains a small GPT, evaluates, generates)\n\n"
        "Errors you can fix print 'error: ...' and exit 2; MEGARAY_DEBUG=1 shows their traceback."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(
    help="Turn raw sources into training shards plus a manifest.json.\n\n"
    "Example: megaray prepare text --source stdlib --out data/stdlib-512 --vocab-size 512",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")


def setup_logging(verbose: bool = False) -> None:
    """Logging for commands that run Ray or long data work: megaray's INFO lines; other libraries'
    INFO chatter and deprecation warnings only with ``verbose`` (``--verbose``, or
    ``MEGARAY_VERBOSE=1``, which also brings back every Ray worker's output)."""
    if verbose:
        os.environ["MEGARAY_VERBOSE"] = "1"
    from megaray.train.console import quiet_driver

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_driver()


#: ``--verbose`` of the commands that start Ray
VERBOSE_OPTION = typer.Option(
    False, "--verbose", "-v", help="show Ray's, DeepSpeed's and the workers' own output (also MEGARAY_VERBOSE=1)"
)


def main() -> None:  # pragma: no cover - the console entry point
    app()
