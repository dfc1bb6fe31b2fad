"""A dead-letter record read back: what failed, why, when, and where it came from.

The reading half of the record format ``deadletter.py`` writes. A DLQ holds two
kinds of records, and :class:`DeadLetter` reads both the same way: the bus's own
(``x-banyan-*`` headers: reason, exception, traceback, handler, attempts) and the
broker's (only RabbitMQ's ``x-death`` headers, when the group queue dead-lettered
a message itself: rejected, delivery limit, expired). Everything read here came
from the broker and may have been written by anyone, so nothing here raises on a
strange value: it reads as None, or as text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from banyan_bus.deadletter import (
    BROKER_REASONS,
    DLQ_EXCEPTION_MESSAGE,
    DLQ_EXCEPTION_TYPE,
    DLQ_GROUP,
    DLQ_HANDLER,
    DLQ_LAST_FAILURE,
    DLQ_ORIGINAL_EXCHANGE,
    DLQ_ORIGINAL_ROUTING_KEY,
    DLQ_REASON,
    DLQ_TRACEBACK,
    HEADER_FIRST_FAILURE,
    HEADER_HANDLED,
    RecordSource,
    republish,
    strip_death_headers,
)
from banyan_bus.envelope import HEADER_ATTEMPT, HEADER_VERSION
from banyan_bus.transport.base import Delivery, Headers, HeaderValue, OutgoingMessage

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
