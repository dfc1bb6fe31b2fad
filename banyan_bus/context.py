"""``MessageContext``: what a handler knows about the message it is handling.

The context of the message being handled lives in a contextvar, so a publish
made anywhere inside a handler (a service it calls, a helper) inherits the
correlation id and names the current message as its cause, with no code from
the user.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

from banyan_bus.transport.base import Delivery, Headers

if TYPE_CHECKING:
    from banyan_bus.envelope import TraceContext

_current: ContextVar[MessageContext | None] = ContextVar("banyan_current_message", default=None)


def current_context() -> MessageContext | None:
    """The context of the message being handled by this task, if any."""
    return _current.get()


class MessageContext:
    """Metadata of one delivery, and (with ``auto_ack=False``) the means to settle it.

    ``timestamp`` is the publish time; ``delay`` the milliseconds the publisher
    asked the message to be delayed (0 if none); ``attempt`` counts from 1 and
    grows with each retry.
    """

    __slots__ = (
        "_auto_ack",
        "_delivery",
        "attempt",
        "causation_id",
        "correlation_id",
        "delay",
        "group",
        "handler",
        "headers",
        "id",
        "message_type",
        "service_name",
        "span",
        "timestamp",
        "trace_context",
        "version",
    )

    def __init__(
        self,
        *,
        id: str,
        message_type: str,
        version: int,
        correlation_id: str | None,
        causation_id: str | None,
        timestamp: datetime,
        delay: int,
        attempt: int,
        service_name: str | None,
        headers: Headers,
        group: str,
        delivery: Delivery | None = None,
        auto_ack: bool = True,
        trace_context: TraceContext | None = None,
    ) -> None:
        self.id = id
        self.message_type = message_type
        self.version = version
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.timestamp = timestamp
        self.delay = delay
        self.attempt = attempt
        self.service_name = service_name
        self.headers = headers
        self.group = group
        self.handler: str = ""
        self._delivery = delivery
        self._auto_ack = auto_ack
        #: The W3C trace context the message arrived with (its envelope's), if any: what
        #: a publish from this handler continues when no OpenTelemetry SDK is set up.
        self.trace_context = trace_context
        #: The OpenTelemetry span of this handling (add attributes or events to it), or
        #: None when tracing is off. Set by the consumer once the span is open.
        self.span: Any = None

    def __repr__(self) -> str:
        return (
            f"MessageContext(id={self.id!r}, message_type={self.message_type!r}, "
            f"version={self.version}, attempt={self.attempt}, group={self.group!r})"
        )

    @property
    def settled(self) -> bool:
        return self._delivery is not None and self._delivery.settled

    def _manual(self, action: str) -> Delivery:
        if self._auto_ack or self._delivery is None:
            raise RuntimeError(
                f"ctx.{action}() is only for subscriptions with auto_ack=False; with "
                f"auto_ack=True the bus acks after the handler returns and retries if it raises."
            )
        return self._delivery

    async def ack(self) -> None:
        """Settle the message as handled. Later failures of this handler are not retried."""
        await self._manual("ack").ack()

    async def nack(self, *, requeue: bool = True) -> None:
        """Return the message to the queue (``requeue=True``) or dead-letter it."""
        await self._manual("nack").nack(requeue=requeue)

    async def reject(self) -> None:
        """Refuse the message: the broker moves it to this group's dead-letter queue."""
        await self._manual("reject").reject()
