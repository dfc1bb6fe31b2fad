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

import hashlib
import json
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from banyan_bus.delay import DELAY_BITS_PATTERN, DELIVERY_EXCHANGE
from banyan_bus.envelope import HEADER_ATTEMPT, HEADER_VERSION, format_timestamp
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


# -- reading -----------------------------------------------------------------------------
# Headers cross AMQP: aio-pika hands back str or bytes for strings, datetimes for
# timestamps; a foreign publisher may put anything anywhere. None of these raise.


def _text(value: HeaderValue | object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None


def _int(value: HeaderValue | object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = _text(value)
    if text is not None:
        try:
            return int(text.strip())
        except ValueError:
            return None
    return None


def _time(value: HeaderValue | object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    text = _text(value)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _envelope_of(body: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _latest_death(headers: Mapping[str, HeaderValue]) -> dict[str, HeaderValue] | None:
    """RabbitMQ keeps ``x-death`` most recent first: entry 0 is what brought it here."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in a dead-letter queue, as an operator needs to see it.

    ``reason`` is ours (``handler-failed``, ``timeout``, ``undecodable``,
    ``unknown-message-type``, ``unknown-version``, ``validation-failed``) when
    the consumer engine wrote the record (``source == "banyan"``), or RabbitMQ's
    ``x-death`` reason in kebab-case (``rejected``, ``delivery-limit``,
    ``expired``, ``max-length``) when the broker dead-lettered it itself
    (``source == "broker"``: no exception, traceback or handler then).

    ``envelope`` is the JSON body when it is a JSON object, else ``None``
    (an undecodable body is still there, untouched, in ``body``).
    ``message_id`` is the AMQP ``message_id``, else the envelope's ``id``;
    :attr:`ref` names the message even when it carries neither.
    """

    message_id: str | None
    message_type: str | None
    version: int | None
    reason: str
    source: RecordSource
    exception_type: str | None
    exception_message: str | None
    traceback: str | None
    attempts: int
    first_failure: datetime | None
    last_failure: datetime | None
    handler: str | None
    group: str | None
    original_exchange: str | None
    original_routing_key: str | None
    headers: Mapping[str, HeaderValue] = field(hash=False)
    body: bytes
    envelope: dict[str, object] | None = field(hash=False)
    correlation_id: str | None = None
    timestamp: datetime | None = None
    priority: int | None = None
    content_type: str | None = None

    @property
    def ref(self) -> str:
        """The message id, or ``sha256:<16 hex>`` of the body for a message without one.

        Stable across peeks, so an id-less poison message can still be chosen
        by ``replay(ids=...)`` or ``purge(ids=...)``.
        """
        if self.message_id:
            return self.message_id
        return "sha256:" + hashlib.sha256(self.body).hexdigest()[:16]

    @classmethod
    def from_delivery(cls, delivery: Delivery, *, group: str | None = None) -> DeadLetter:
        """Read a DLQ delivery. Never raises: a record it cannot read is ``unknown``.

        ``group`` fills in the group when the record does not name it (broker
        dead-letters never do; the queue's name does).
        """
        headers = delivery.headers
        envelope = _envelope_of(delivery.body)
        env_id = _text(envelope.get("id")) if envelope else None
        env_type = _text(envelope.get("messageType")) if envelope else None
        env_version = _int(envelope.get("version")) if envelope else None
        version = _int(headers.get(HEADER_VERSION))
        attempt = _int(headers.get(HEADER_ATTEMPT))
        source, reason = _classify(headers)
        death = _latest_death(headers) if source == "broker" else None
        if death is not None:
            routing_keys = death.get("routing-keys")
            original_key = (
                _text(routing_keys[0]) if isinstance(routing_keys, list) and routing_keys else None
            )
            original_exchange = _text(death.get("exchange"))
            last_failure = _time(death.get("time"))
        else:
            original_exchange = _text(headers.get(DLQ_ORIGINAL_EXCHANGE))
            original_key = _text(headers.get(DLQ_ORIGINAL_ROUTING_KEY))
            last_failure = _time(headers.get(DLQ_LAST_FAILURE))
        banyan = source == "banyan"
        return cls(
            message_id=delivery.message_id or env_id,
            message_type=delivery.message_type or env_type,
            version=version if version is not None else env_version,
            reason=reason,
            source=source,
            exception_type=_text(headers.get(DLQ_EXCEPTION_TYPE)) if banyan else None,
            exception_message=_text(headers.get(DLQ_EXCEPTION_MESSAGE)) if banyan else None,
            traceback=_text(headers.get(DLQ_TRACEBACK)) if banyan else None,
            attempts=attempt if attempt is not None and attempt > 0 else 1,
            first_failure=_time(headers.get(HEADER_FIRST_FAILURE)) or last_failure,
            last_failure=last_failure,
            handler=(_text(headers.get(DLQ_HANDLER)) or None) if banyan else None,
            group=_text(headers.get(DLQ_GROUP)) or group,
            original_exchange=original_exchange,
            original_routing_key=original_key,
            headers=dict(headers),
            body=delivery.body,
            envelope=envelope,
            correlation_id=delivery.correlation_id,
            timestamp=delivery.timestamp,
            priority=delivery.priority,
            content_type=delivery.content_type,
        )

    @property
    def handled(self) -> list[str]:
        """The handlers the record says had succeeded (``x-banyan-handled``), if any."""
        raw = self.headers.get(HEADER_HANDLED)
        if raw is None:
            return []
        return [str(n) for n in raw] if isinstance(raw, list) else [str(raw)]

    def replay_message(self, *, keep_progress: bool = False) -> OutgoingMessage:
        """The message as it was first published: same id, body and properties.

        Dropped: our failure record (``x-banyan-*``), the attempt counter (the
        replay is attempt 1, with the policy's full set of retries), and the
        broker's dead-letter bookkeeping (``x-death``, ``x-delivery-count``...).
        ``x-banyan-handled`` (the handlers that had succeeded) is dropped too,
        so a replay runs every handler, unless ``keep_progress``: then it is
        kept, and the caller must send the message through the group's retry
        route for the group to believe it (``deadletter.handled_before``).
        """
        headers: Headers = {
            key: value
            for key, value in self.headers.items()
            if (keep_progress and key == HEADER_HANDLED)
            or not (key.startswith("x-banyan-") or key == HEADER_ATTEMPT)
        }
        strip_death_headers(headers)
        return republish(self, headers)


def _classify(headers: Mapping[str, HeaderValue]) -> tuple[RecordSource, str]:
    """Whose record is this, and its reason.

    Both kinds can be present when a message that had been dead-lettered by us
    was moved back by hand and then dead-lettered by the broker; the later one
    tells why it is here now.
    """
    ours = _text(headers.get(DLQ_REASON))
    death = _latest_death(headers)
    broker_reason = _text(death.get("reason")) if death is not None else None
    if ours and broker_reason is not None and death is not None:
        ours_at = _time(headers.get(DLQ_LAST_FAILURE))
        death_at = _time(death.get("time"))
        if ours_at is not None and death_at is not None and death_at > ours_at:
            ours = None
    if ours:
        return "banyan", ours
    if broker_reason is not None:
        return "broker", BROKER_REASONS.get(broker_reason, broker_reason.replace("_", "-"))
    return "unknown", "unknown"
