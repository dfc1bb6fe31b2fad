"""The message fields every log line inside a handler carries, as structlog contextvars.

``structlog.contextvars.bind_contextvars`` looks each key up and builds a token
map on every call; per message that showed in profiles. The variables are the
same every time, so they are looked up once, here, and then only ``set``.
Lines get the fields through structlog's ``merge_contextvars`` processor (in
structlog's default configuration and in ``banyan_bus.logging.configure``).
Each delivery runs in its own task, whose context dies with it, so nothing
needs resetting.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from structlog.contextvars import bind_contextvars, reset_contextvars

_MESSAGE_KEYS = (
    "event_id",
    "message_type",
    "version",
    "correlation_id",
    "causation_id",
    "trace_id",
    "span_id",
    "service",
    "group",
)
_HANDLER_KEYS = ("handler", "attempt")


def _structlog_vars(keys: tuple[str, ...]) -> tuple[ContextVar[Any], ...]:
    # Binding creates (or finds) structlog's own variables; reset leaves this
    # module's importer untouched. Ellipsis is structlog's "unset".
    tokens = bind_contextvars(**dict.fromkeys(keys, ...))
    reset_contextvars(**tokens)
    return tuple(tokens[key].var for key in keys)


(
    _EVENT_ID,
    _MESSAGE_TYPE,
    _VERSION,
    _CORRELATION_ID,
    _CAUSATION_ID,
    _TRACE_ID,
    _SPAN_ID,
    _SERVICE,
    _GROUP,
) = _structlog_vars(_MESSAGE_KEYS)
_HANDLER, _ATTEMPT = _structlog_vars(_HANDLER_KEYS)


def bind_message_log_context(
    event_id: str,
    message_type: str,
    version: int,
    correlation_id: str | None,
    causation_id: str | None,
    trace_id: str | None,
    span_id: str | None,
    service: str,
    group: str,
) -> None:
    _EVENT_ID.set(event_id)
    _MESSAGE_TYPE.set(message_type)
    _VERSION.set(version)
    _CORRELATION_ID.set(correlation_id)
    _CAUSATION_ID.set(causation_id)
    _TRACE_ID.set(trace_id)
    _SPAN_ID.set(span_id)
    _SERVICE.set(service)
    _GROUP.set(group)


def bind_handler_log_context(handler: str, attempt: int) -> None:
    _HANDLER.set(handler)
    _ATTEMPT.set(attempt)
