"""Where a command's output goes, and the options every command shares.

stdout is for the command's result (a message id, a table, a document);
stderr for log lines, notes and errors, so ``banyan ... | jq`` reads only the
result.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

# Piped output is read by people too (CI logs, `| less`): wide enough for queue names.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

#: Client libraries that log a connection failure themselves, which we report as one line.
_CLIENT_LOGGERS = ("aiormq", "aio_pika")


# What a hostile publisher could put in an id, a header or an error message to act on
# the operator's terminal: whole escape sequences first (CSI ``ESC [ ... final``, OSC
# ``ESC ] ... BEL|ST`` as in a title change or an OSC-8 hyperlink, DCS/SOS/PM/APC
# strings, two-byte ``ESC x``), their 8-bit C1 forms (``\x9b`` CSI, ``\x9d`` OSC ...),
# then any control character left: C0, DEL, C1, and the bidi controls that reorder
# what is shown (Trojan Source: U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C).
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"  # CSI
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC...
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"  # ESC x, ESC ( B ...
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_LINES = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def safe(value: object, *, lines: bool = False) -> str:
    """``str(value)`` with nothing left that a terminal would act on.

    Every command prints what came from the broker (ids, types, reasons,
    exception messages, tracebacks, headers) through this: any publisher can
    write those, and an escape sequence in a message id must not retitle the
    operator's terminal, clear it, or show a link that goes somewhere else.
    Escape sequences go as a whole, other control characters one by one;
    ``lines=True`` keeps newlines and tabs (a traceback). The result is plain
    text: pass it through :func:`markup` before rich renders it.

    >>> safe("evt_1\x1b]0;pwned\x07\x1b[2J")
    'evt_1'
    """
    text = _ESCAPE_SEQUENCE.sub("", str(value))
    return (_CONTROL_KEEP_LINES if lines else _CONTROL).sub("", text)


def markup(value: object, *, lines: bool = False) -> str:
    """:func:`safe` text, escaped for rich's markup (``[bold]`` in an id stays text)."""
    return escape(safe(value, lines=lines))


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout, every non-ASCII character escaped.

    JSON keeps values exact (an id is still the id a script can look up); the
    escaping keeps ESC, C1 and bidi controls out of the terminal as ``\\u001b``.
    """
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True, default=str) + "\n")
    sys.stdout.flush()


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
