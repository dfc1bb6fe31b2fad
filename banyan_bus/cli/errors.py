"""What the user sees when a command fails: one line on stderr and an exit code.

A mistake the user can fix (a bad target, an unknown message type, invalid
JSON, a broker that does not answer) is one line, no traceback: 2 for bad
input, 1 for everything else, 130 after Ctrl-C. ``--debug`` lets the
exception through with its traceback instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from pydantic import ValidationError

from banyan_bus.cli.output import err, markup
from banyan_bus.errors import BanyanError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A mistake the user can fix from the message alone: one line, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str) -> str:
    return " ".join(text.split())


def describe_validation(exc: ValidationError, what: str | None = None) -> str:
    """At most five of pydantic's complaints, each as ``field.path: message``."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        problems.append(f"{where}: {error['msg']}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return f"payload does not fit {what or exc.title}: " + "; ".join(problems) + more


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for ``exc``."""
    if isinstance(exc, CliError):
        return exc.exit_code, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_USAGE, describe_validation(exc)
    if isinstance(exc, BanyanError):
        return EXIT_FAILURE, str(exc)
    return EXIT_FAILURE, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


@contextlib.contextmanager
def reported(*, debug: bool) -> Iterator[None]:
    """Turn any failure into one line on stderr and a non-zero exit (all of it with ``debug``)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if debug:
            raise
        code, message = describe(exc)
        err.print(f"banyan: error: {markup(one_line(message))}", soft_wrap=True)
        raise typer.Exit(code) from None
