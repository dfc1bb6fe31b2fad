"""The ``banyan`` command: run a service, publish an event, show its topology, document it.

::

    banyan run examples.signup.email_service:bus [--workers N] [--grace SECONDS]
    banyan publish examples.signup.user_service:bus UserCreated '{"userId": "usr_1", ...}'
    banyan topology examples.signup.email_service:bus [--declare] [--json]
    banyan asyncapi examples.signup.email_service:bus [-o asyncapi.json]
    banyan dlq list|show|replay|purge examples.signup.email_service:bus [--type T] [--group G]
    banyan contracts snapshot|check examples.signup.email_service:bus

A *target* is ``module:attribute``: the attribute is a ``MessageBus``, or
``module:factory()`` names a callable (sync or async) that returns one. The
current directory is importable, as with ``python -m``.

Errors a user can fix (a bad target, an unknown message type, invalid JSON, a
broker that does not answer) print one line on stderr and exit non-zero:
2 for bad input, 1 for everything else. ``--debug`` shows the traceback.

One module per command group, wired here: ``run`` (and ``supervisor`` for
``--workers``), ``publish``, ``topology``, ``asyncapi``, ``dlq``, ``contracts``; beneath them
``targets`` (loading the user's service), ``errors`` (one-line reporting) and
``output`` (stdout/stderr, the root options). The root options travel in
typer's context object (``ctx.obj``), not in a module global.
"""

from __future__ import annotations

from typing import Annotated

import typer

from banyan_bus.cli import asyncapi, contracts, dlq, publish, run, topology
from banyan_bus.cli.errors import CliError
from banyan_bus.cli.output import LogFormat, Options

__all__ = ["CliError", "app", "main"]

app = typer.Typer(
    name="banyan",
    help="Run and operate banyan_bus services.",
    no_args_is_help=True,
    add_completion=False,
    # One line per error unless --debug; typer's rich tracebacks would bury it.
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and debug log lines.")
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(help="Log lines: JSON, console, or auto (JSON unless on a terminal)."),
    ] = LogFormat.auto,
) -> None:
    ctx.obj = Options(debug=debug, log_format=log_format)


app.command()(run.run)
app.command()(publish.publish)
app.command()(topology.topology)
app.command()(asyncapi.asyncapi)
app.add_typer(dlq.app, name="dlq")
app.add_typer(contracts.app, name="contracts")


def main() -> None:
    """Entry point of the ``banyan`` console script."""
    app()
