"""Operate a group's dead-letter queue: look at what failed, replay it, or drop it.

A dead-letter queue (``dlq.exchange.platform.events.{group}.{event}``) holds
two kinds of records, and :class:`DeadLetter` reads both the same way:

- our own, written by the consumer engine (``consume.py``): the original body,
  properties and headers plus ``x-banyan-reason``, the exception, a trimmed
  traceback, ``x-attempt``, the handler, the group and the failure times;
- the broker's, when the group queue dead-lettered a message itself through
  its ``x-dead-letter-*`` arguments (a consumer rejected it, it exceeded the
  quorum delivery limit, it expired): RabbitMQ's ``x-death`` headers and
  nothing else.

Example::

    dlq = dead_letter_queue(bus.transport, "email-service", UserCreated)
    for dead in await dlq.list():
        print(dead.message_id, dead.reason, dead.exception_message)
    result = await dlq.replay(where=lambda d: d.reason == "handler-failed")
    assert not result.failed, result.failed

**Peeking.** AMQP has no "browse": :meth:`DeadLetterQueue.list` takes messages
with ``basic.get`` and, once it has read them all, gives every one back
(``nack`` with requeue). Holding all of them until the end is what makes the
read terminate: a requeued message is ready again at once (a quorum queue puts
it behind the others), so give-back-as-you-go would read it again and again.
A peek changes nothing but the broker's redelivery flag and delivery count.

**Moving.** A replay is a move, so it follows the engine's rule for moves: the
copy is published to the group's *own* exchange with publisher confirms and
``mandatory``, and only after the broker confirmed it is the DLQ copy acked.
When the publish fails the DLQ copy is given back and the error is reported:
nothing is lost, at worst a message is replayed twice (if the ack is lost),
which the original message id lets idempotent handlers absorb.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import structlog

from banyan_bus import topology
from banyan_bus.consume import (
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
    strip_death_headers,
)
from banyan_bus.contracts import Message, routing_key_for
from banyan_bus.envelope import HEADER_ATTEMPT, HEADER_VERSION
from banyan_bus.errors import BanyanError, TopologyError
from banyan_bus.transport.base import (
    Delivery,
    Headers,
    HeaderValue,
    OutgoingMessage,
    Transport,
)

__all__ = [
    "BROKER_REASONS",
    "DeadLetter",
    "DeadLetterQueue",
    "ReplayResult",
    "dead_letter_queue",
]

log = structlog.get_logger("banyan_bus.dlq")

#: RabbitMQ's ``x-death`` reasons, spelled like our own reasons (kebab-case).
BROKER_REASONS: Mapping[str, str] = {
    "rejected": "rejected",
    "delivery_limit": "delivery-limit",
    "expired": "expired",
    "maxlen": "max-length",
}

RecordSource = Literal["banyan", "broker", "unknown"]

# -- reading header values ---------------------------------------------------------------
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

    def replay_message(self) -> OutgoingMessage:
        """The message as it was first published: same id, body and properties.

        Dropped: our failure record (``x-banyan-*``), the attempt counter (the
        replay is attempt 1, with the policy's full set of retries), and the
        broker's dead-letter bookkeeping (``x-death``, ``x-delivery-count``...).
        Kept: ``x-banyan-handled``, which names the handlers that already
        succeeded, so a replay - like a retry - does not run them again.
        """
        headers: Headers = {
            key: value
            for key, value in self.headers.items()
            if key == HEADER_HANDLED or not (key.startswith("x-banyan-") or key == HEADER_ATTEMPT)
        }
        strip_death_headers(headers)
        return OutgoingMessage(
            body=self.body,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            message_type=self.message_type,
            timestamp=self.timestamp,
            headers=headers,
            priority=self.priority,
            content_type=self.content_type or "application/json",
        )


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


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay did. ``replayed`` and ``failed`` are keyed by :attr:`DeadLetter.ref`.

    ``failed`` maps each message whose publish was not confirmed to the error;
    those messages are still in the DLQ, unchanged. ``missing`` lists ids that
    were asked for and not found in the DLQ.
    """

    replayed: builtins.list[str] = field(default_factory=builtins.list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: builtins.list[str] = field(default_factory=builtins.list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing


_Held = builtins.list[tuple[Delivery, DeadLetter]]

#: How long a give-back waits for the broker to show the messages as ready again.
_GIVE_BACK_WAIT_S = 5.0


class DeadLetterQueue:
    """The DLQ of one group's subscription to one message type.

    Every operation works on the messages that were in the queue when it
    started; one that arrives meanwhile is left for the next call.
    """

    def __init__(self, transport: Transport, group: str, message_type: str) -> None:
        self.transport = transport
        self.group = group
        self.message_type = message_type
        #: ``dlq.exchange.platform.events.{group}.{event}``
        self.name = topology.dead_letter_queue(group, message_type)
        #: Where replays go: the group's own exchange, so no other group sees a duplicate.
        self.target_exchange = topology.group_exchange(group, message_type)

    def __repr__(self) -> str:
        return f"<DeadLetterQueue {self.name!r}>"

    async def count(self) -> int:
        """Messages ready in the DLQ (not those another operator is holding right now)."""
        state = await self.transport.queue_state(self.name)
        if state is None:
            raise TopologyError(
                f"dead-letter queue {self.name!r} does not exist: group {self.group!r} has "
                f"never subscribed to {self.message_type} on this broker (check the group "
                f"and the message type)."
            )
        return state.messages

    async def list(self, limit: int = 100) -> builtins.list[DeadLetter]:
        """The first ``limit`` messages, oldest first, left in the queue."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        held, ready = await self._take(limit)
        await self._give_back(held, ready)
        return [dead for _, dead in held]

    async def find(self, ref: str) -> DeadLetter | None:
        """The message whose :attr:`DeadLetter.ref` is ``ref``, left in the queue."""
        held, ready = await self._take(None)
        await self._give_back(held, ready)
        return next((dead for _, dead in held if dead.ref == ref), None)

    async def replay(
        self,
        ids: Iterable[str] | None = None,
        where: Callable[[DeadLetter], bool] | None = None,
    ) -> ReplayResult:
        """Send messages back to the group: those in ``ids``, those ``where`` accepts, or all.

        Each is published to the group's exchange with its original id, body
        and properties, attempts reset (see :meth:`DeadLetter.replay_message`),
        confirmed, and only then removed from the DLQ. One that cannot be
        published stays in the DLQ and is reported in ``failed``.
        """
        wanted = None if ids is None else set(ids)
        target = self.target_exchange
        routing_key = routing_key_for(self.message_type)
        # Publishing to a missing exchange makes RabbitMQ close the publishing
        # channel, which every publisher of this connection shares: check first.
        blocked = None
        if not await self.transport.exchange_exists(target):
            blocked = (
                f"exchange {target!r} does not exist (was the subscription removed?); "
                f"the message stays in {self.name!r}"
            )
        replayed: builtins.list[str] = []
        failed: dict[str, str] = {}
        held, ready = await self._take(None)
        try:
            for delivery, dead in held:
                if not _chosen(dead, wanted, where):
                    continue
                if blocked is not None:
                    failed[dead.ref] = blocked
                    continue
                try:
                    await self.transport.publish(
                        target, routing_key, dead.replay_message(), confirm=True, mandatory=True
                    )
                except (BanyanError, TypeError, ValueError, OverflowError) as exc:
                    # TypeError/ValueError/OverflowError: headers the AMQP client cannot
                    # encode (a non-UTF-8 string, a double beyond float32), which the
                    # transport does not translate yet. One such message must not stop
                    # the replay of the others.
                    failed[dead.ref] = f"{type(exc).__name__}: {exc}"
                    continue
                await self._settle(delivery, ack=True)
                replayed.append(dead.ref)
        finally:
            await self._give_back(held, ready - len(replayed))
        missing = sorted(wanted - {dead.ref for _, dead in held}) if wanted else []
        log.info(
            "dlq_replayed",
            queue=self.name,
            replayed=len(replayed),
            failed=len(failed),
            missing=len(missing),
        )
        return ReplayResult(replayed=replayed, failed=failed, missing=missing)

    async def purge(
        self,
        ids: Iterable[str] | None = None,
        where: Callable[[DeadLetter], bool] | None = None,
    ) -> int:
        """Delete messages for good: those in ``ids``, those ``where`` accepts, or all.

        Returns how many were deleted.
        """
        if ids is None and where is None:
            dropped = await self.transport.purge_queue(self.name)
            log.warning("dlq_purged", queue=self.name, dropped=dropped)
            return dropped
        wanted = None if ids is None else set(ids)
        dropped = 0
        held, ready = await self._take(None)
        try:
            for delivery, dead in held:
                if _chosen(dead, wanted, where):
                    await self._settle(delivery, ack=True)
                    dropped += 1
        finally:
            await self._give_back(held, ready - dropped)
        log.warning("dlq_purged", queue=self.name, dropped=dropped)
        return dropped

    # -- holding messages ---------------------------------------------------------------

    async def _take(self, limit: int | None) -> tuple[_Held, int]:
        """``basic.get`` up to ``limit`` (or all ready) messages and hold them unacked.

        Bounded by the ready count at the start (returned with the messages),
        so a requeued or newly arrived message is never read twice in one
        operation.
        """
        ready = await self.count()
        budget = ready if limit is None else min(ready, limit)
        held: _Held = []
        try:
            for _ in range(budget):
                delivery = await self.transport.get(self.name)
                if delivery is None:  # someone else holds or took the rest
                    break
                held.append((delivery, DeadLetter.from_delivery(delivery, group=self.group)))
        except BaseException:
            await self._give_back(held, None)
            raise
        return held, ready

    async def _give_back(self, held: _Held, expected: int | None) -> None:
        """Requeue what is still held, then wait until the queue shows it again.

        ``basic.nack`` has no reply, and a quorum queue applies the return
        through its log: without the wait, a ``list()`` followed at once by a
        ``replay()`` would see a DLQ that looks emptier than it is and replay
        only part of it. ``expected`` is how many messages must be ready again
        (those there at the start minus those this operation removed); the wait
        is bounded, since others may be holding or removing messages too.
        """
        returned = 0
        for delivery, _ in held:
            if not delivery.settled:
                await self._settle(delivery, ack=False)
                returned += 1
        if not returned or expected is None:
            return
        deadline = asyncio.get_running_loop().time() + _GIVE_BACK_WAIT_S
        while (state := await self.transport.queue_state(self.name)) is not None:
            if state.messages >= expected or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.005)

    async def _settle(self, delivery: Delivery, *, ack: bool) -> None:
        """Ack or requeue, tolerating a lost channel: the broker then requeues it anyway."""
        try:
            if ack:
                await delivery.ack()
            else:
                await delivery.nack(requeue=True)
        except BanyanError as exc:
            log.warning(
                "dlq_settle_failed",
                queue=self.name,
                message_id=delivery.message_id,
                action="ack" if ack else "requeue",
                error=str(exc),
                detail="the broker returns the message to the DLQ; a replayed message may "
                "then be replayed again later (same id: idempotent handlers absorb it)",
            )


def _chosen(
    dead: DeadLetter, wanted: set[str] | None, where: Callable[[DeadLetter], bool] | None
) -> bool:
    if wanted is not None and dead.ref not in wanted:
        return False
    return where is None or where(dead)


def dead_letter_queue(
    bus_transport: Transport, group: str, contract_or_message_type: type[Message] | str
) -> DeadLetterQueue:
    """The DLQ of ``group``'s subscription to a contract class or a message type name."""
    if isinstance(contract_or_message_type, str):
        message_type = contract_or_message_type
    else:
        message_type = contract_or_message_type.__message_type__
    return DeadLetterQueue(bus_transport, topology.check_group_name(group), message_type)
