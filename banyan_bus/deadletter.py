"""The dead-letter record: how a failed message is written to a DLQ, and read back.

A record is the original message - body, properties, headers - with the
failure written into ``x-banyan-*`` headers. This module owns that format; the
consumer engine (``consume.py``) writes records, the DLQ tooling (``dlq.py``)
reads and replays them, and neither knows the other.

Two headers outlive one delivery and travel with a message's retries:
``x-banyan-first-failure`` (when its first attempt failed) and
``x-banyan-handled`` (the handlers that already succeeded, so that a retry
runs only the one that failed and those after it). A header is only as
trustworthy as its sender, and any publisher can write ``x-banyan-handled``:
:func:`handled_before` says when the bus honours it (only on its own retry
route), and a replay drops it unless the operator asks to keep it.

**Copies, not moves.** AMQP cannot move a message: a retry, a dead-letter
record and a replay are each a new publish of the original (:func:`republish`),
after which the old copy is acked. Two things must be dropped or fixed on the
way, or the copy is lost or wedged:

- RabbitMQ's own dead-letter headers (``x-death``...): RabbitMQ 3.10 reads
  ``x-death`` to detect dead-letter cycles, and would drop a retry's second
  trip through the same delay level;
- header values another client wrote that aio-pika reads but cannot write
  (a non-UTF-8 string, a double beyond float32): a message we cannot
  republish would never leave its queue.

A DLQ also holds the broker's own records, when the group queue dead-lettered a
message through its ``x-dead-letter-*`` arguments (rejected, delivery limit,
expired): RabbitMQ's ``x-death`` headers and nothing else. :class:`DeadLetter`
reads both kinds the same way.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, Protocol

from banyan_bus.delay import DELAY_BITS_PATTERN, DELIVERY_EXCHANGE
from banyan_bus.envelope import HEADER_ATTEMPT, format_timestamp
from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Delivery,
    Headers,
    HeaderValue,
    OutgoingMessage,
    Transport,
)

#: The handlers that already succeeded for a message (a list of names).
HEADER_HANDLED = "x-banyan-handled"
#: When the message's first attempt failed (ISO 8601, UTC).
HEADER_FIRST_FAILURE = "x-banyan-first-failure"
# The record itself (DESIGN.md §4), on our records only.
DLQ_REASON = "x-banyan-reason"
DLQ_EXCEPTION_TYPE = "x-banyan-exception-type"
DLQ_EXCEPTION_MESSAGE = "x-banyan-exception-message"
DLQ_TRACEBACK = "x-banyan-traceback"
DLQ_HANDLER = "x-banyan-handler"
DLQ_GROUP = "x-banyan-group"
DLQ_LAST_FAILURE = "x-banyan-last-failure"
DLQ_ORIGINAL_EXCHANGE = "x-banyan-original-exchange"
DLQ_ORIGINAL_ROUTING_KEY = "x-banyan-original-routing-key"

#: RabbitMQ's ``x-death`` reasons, spelled like our own reasons (kebab-case).
BROKER_REASONS: Mapping[str, str] = {
    "rejected": "rejected",
    "delivery_limit": "delivery-limit",
    "expired": "expired",
    "maxlen": "max-length",
}

RecordSource = Literal["banyan", "broker", "unknown"]

_TRACEBACK_LIMIT = 4000

# Headers RabbitMQ adds when it dead-letters (see the module docstring).
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


# -- writing -----------------------------------------------------------------------------


def strip_death_headers(headers: Headers) -> None:
    for name in _DEATH_HEADERS:
        headers.pop(name, None)


def set_handled(headers: Headers, handled: Sequence[str]) -> None:
    """Write the handlers that succeeded into ``headers``, or remove the header.

    Removing matters: a header that arrived forged (and so was not honoured,
    see :func:`handled_before`) must not ride a retry back in through the
    route where it would be.
    """
    if handled:
        headers[HEADER_HANDLED] = list[HeaderValue](handled)
    else:
        headers.pop(HEADER_HANDLED, None)


_BITS_LEN = len(DELAY_BITS_PATTERN)


def handled_before(delivery: Delivery, destination: str) -> tuple[list[str], bool]:
    """The handlers a delivery says already succeeded, and whether that is believed.

    Returns ``(names, trusted)``: ``names`` as the header lists them (empty
    when there is no header), ``trusted`` whether the consumer may skip them.

    The header is believed only on a message that reached the group through
    the bus's own retry route: dead-lettered out of the delay levels into the
    delay delivery exchange (``banyan.delay.delivery``) with a routing key
    whose destination is this group's exchange (``destination``) - which is
    how ``consume.py`` sends a retry, and the one place it writes the header.
    A message published to the root exchange (every event), straight to the
    group's exchange (a replay), or as a delayed publish (``after=``, whose
    destination is the root exchange) arrives with another exchange or
    destination, so a header it carries is ignored and every handler runs.
    The exchange and routing key of a delivery are set by the broker, not by
    the message's headers, so a publisher cannot fake them from the root
    exchange.

    Why not an HMAC over the id and the names: the secret would have to be
    shared by every instance of the group (a retry is consumed by whichever
    instance is free), i.e. configured and distributed, and a per-process
    secret would turn every cross-instance retry into a re-run. Why not
    ``x-attempt > 1`` as well: the publisher writes ``x-attempt`` too, and a
    retry that waits for another worker's idempotency claim keeps attempt 1.

    The boundary, said plainly: a client allowed to publish to the
    ``banyan.delay.*`` exchanges (which ``after=`` needs) can still write a
    message that takes this route. Give publishers you do not trust write
    permission on ``exchange.platform.events`` only. Ignoring a header can
    only cost a duplicate run (at-least-once already allows it); believing a
    forged one would drop the message, which is why the rule errs this way.
    """
    raw = delivery.headers.get(HEADER_HANDLED)
    if raw is None:
        return [], True
    names = [str(n) for n in raw] if isinstance(raw, list) else [str(raw)]
    routing_key = delivery.routing_key
    trusted = (
        delivery.exchange == DELIVERY_EXCHANGE
        and routing_key[_BITS_LEN:] == destination
        and routing_key[_BITS_LEN - 1 : _BITS_LEN] == "."
    )
    return names, trusted


class Original(Protocol):
    """What a copy is made from: a delivery, or a record read from a DLQ."""

    @property
    def body(self) -> bytes: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def message_type(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def content_type(self) -> str | None: ...


def republish(original: Original, headers: Mapping[str, HeaderValue]) -> OutgoingMessage:
    """A copy of ``original``, with ``headers``, that any AMQP client can send.

    Same body, id and properties; the caller chooses the headers (and strips
    the broker's death headers from them).
    """
    return OutgoingMessage(
        body=original.body,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        message_type=original.message_type,
        timestamp=original.timestamp,
        headers={str(k): _writable(v) for k, v in headers.items()},
        priority=original.priority,
        content_type=original.content_type or "application/json",
    )


def _writable(value: HeaderValue) -> HeaderValue:
    """A header value any AMQP client can send back.

    aio-pika reads a non-UTF-8 string header as ``bytes`` and a wide double as a
    ``float``, and cannot write either again.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and (value != value or abs(value) > 3.4e38):
        return repr(value)
    if isinstance(value, list):
        return [_writable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _writable(v) for k, v in value.items()}
    return value


def record_headers(
    delivery: Delivery,
    reason: str,
    *,
    exc: BaseException,
    handler: str,
    group: str,
    attempt: int,
    handled: Sequence[str] = (),
) -> Headers:
    """The delivery's headers with the failure written in, death headers dropped.

    ``handled``: the handlers that succeeded for this message (what the
    consumer believed, not what the delivery claimed).
    """
    now = format_timestamp(datetime.now(UTC))
    headers: Headers = dict(delivery.headers)
    strip_death_headers(headers)
    set_handled(headers, handled)
    headers.update(
        {
            DLQ_REASON: reason,
            DLQ_EXCEPTION_TYPE: type(exc).__qualname__,
            DLQ_EXCEPTION_MESSAGE: str(exc)[:_TRACEBACK_LIMIT],
            DLQ_TRACEBACK: _trimmed_traceback(exc),
            HEADER_ATTEMPT: attempt,
            DLQ_HANDLER: handler,
            DLQ_GROUP: group,
            DLQ_LAST_FAILURE: now,
            DLQ_ORIGINAL_EXCHANGE: delivery.exchange,
            DLQ_ORIGINAL_ROUTING_KEY: delivery.routing_key,
        }
    )
    headers.setdefault(HEADER_FIRST_FAILURE, now)
    return headers


async def write_record(
    transport: Transport,
    queue: str,
    delivery: Delivery,
    reason: str,
    *,
    exc: BaseException,
    handler: str,
    group: str,
    attempt: int,
    handled: Sequence[str] = (),
) -> None:
    """Publish ``delivery``'s record to the DLQ named ``queue``, confirmed.

    Raises what the publish raises (``BanyanError``); the caller still holds
    the original and decides what becomes of it.
    """
    headers = record_headers(
        delivery, reason, exc=exc, handler=handler, group=group, attempt=attempt, handled=handled
    )
    await transport.publish(
        DEFAULT_EXCHANGE, queue, republish(delivery, headers), confirm=True, mandatory=True
    )


def _trimmed_traceback(exc: BaseException) -> str:
    if exc.__traceback__ is None:
        return ""
    text = "".join(traceback.format_exception(exc))
    if len(text) > _TRACEBACK_LIMIT:
        text = "…" + text[-_TRACEBACK_LIMIT:]
    return text
