"""Where a command's output goes, and the options every command shares.

stdout is for the command's result (a message id, a table, a document);
stderr for log lines, notes and errors, so ``banyan ... | jq`` reads only the
result.
"""

from __future__ import annotations

import enum
import logging
import sys
from dataclasses import dataclass

import typer
from rich.console import Console

# Piped output is read by people too (CI logs, `| less`): wide enough for queue names.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

#: Client libraries that log a connection failure themselves, which we report as one line.
_CLIENT_LOGGERS = ("aiormq", "aio_pika")


class LogFormat(enum.StrEnum):
    auto = "auto"
    console = "console"
    json = "json"


@dataclass(frozen=True)
class Options:
    """The root options (``banyan --debug --log-format json ...``), kept in ``ctx.obj``."""

    debug: bool = False
    log_format: LogFormat = LogFormat.auto


def options(ctx: typer.Context) -> Options:
    """The root options of this invocation (the defaults if the root callback did not run)."""
    found = ctx.find_object(Options)
    return found if found is not None else Options()


def configure_logging(opts: Options, level: int = logging.INFO) -> None:
    """The platform's structlog setup (``banyan_bus.logging``), on stderr.

    JSON lines unless stderr is a terminal, or as ``--log-format`` says;
    ``--debug`` lowers the level to DEBUG.
    """
    from banyan_bus.logging import configure

    if opts.debug:
        level = logging.DEBUG
    json_lines = None if opts.log_format == LogFormat.auto else opts.log_format == LogFormat.json
    configure(json=json_lines, level=level)
    quiet_clients(not opts.debug)


def quiet_clients(quiet: bool) -> None:
    """Silence aio-pika/aiormq's own error lines while connecting: a failed connect is
    reported once, by us. Once connected, their reconnect warnings matter again."""
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL if quiet else logging.WARNING)
