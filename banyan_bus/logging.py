"""A sensible structlog setup: JSON lines in production, readable lines on a terminal.

Inside a handler the bus binds the message's fields (event id, message type,
version, correlation and causation ids, trace and span ids, service, group,
handler, attempt) as structlog contextvars, so every log line a handler
writes, through any structlog logger, carries them. ``merge_contextvars`` is
what puts them into the line; keep it first if you configure structlog yourself.

Example::

    from banyan_bus.logging import configure
    configure()                 # JSON unless stderr is a terminal
    configure(json=True, level="DEBUG")
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(*, json: bool | None = None, level: int | str = "INFO") -> None:
    """Configure structlog (and route the standard library's logging through it).

    ``json=None`` picks JSON when stderr is not a terminal: containers and
    log shippers get one JSON object per line, a developer gets colours.
    """
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if json else _keep_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_safe_logger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("aiormq").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aio_pika").setLevel(max(numeric, logging.WARNING))


class _SafePrintLogger(structlog.PrintLogger):
    """Never lets a log line fail the code that logs: a closed pipe (``| head``) or a
    full disk must not turn a handled message into a retried one."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except OSError:
            pass

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _safe_logger(*args: Any) -> _SafePrintLogger:
    return _SafePrintLogger(sys.stderr)


def _keep_exc_info(_: Any, __: str, event_dict: Any) -> Any:
    # The console renderer formats exceptions itself (with colours); leave them.
    return event_dict
