"""Hostile bodies (issue 16, point 2): every decode failure is a ``DecodeError`` with
reason ``undecodable``, and on memory:// it is dead-lettered at once while good
messages around it are handled exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy
from banyan_bus.contracts import ContractRegistry
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.envelope import (
    HEADER_UNDECODABLE,
    MAX_FIELD_LENGTH,
    MAX_JSON_DEPTH,
    DecodeError,
    decode,
)
from banyan_bus.transport.base import Delivery, Headers, OutgoingMessage
from tests.support import duplicates, wait_until


class ParcelWeighed(Event):
    parcel_id: str
    grams: int = 0


def envelope(message_id: str = "evt_1", **fields: object) -> bytes:
    data: dict[str, object] = {
        "id": message_id,
        "correlationId": "cor_1",
        "timestamp": "2025-11-15T10:30:00.123Z",
        "serviceName": "scale",
        "messageType": "ParcelWeighed",
        "version": 1,
        "payload": {"parcelId": "p1"},
    }
    data.update(fields)
    return json.dumps(data).encode()


HOSTILE_BODIES: dict[str, tuple[bytes, str]] = {
    "100000-brackets": (b"[" * 100_000, f"deeper than {MAX_JSON_DEPTH} levels"),
    "40000-braces": (b'{"a":' * 40_000, f"deeper than {MAX_JSON_DEPTH} levels"),
    "payload-nested-too-deep": (
        envelope(payload={"parcelId": "p", "x": json.loads("[" * 250 + "]" * 250)}),
        "deeper than",
    ),
    "id-200kb": (envelope("i" * 200_000), f"at most {MAX_FIELD_LENGTH} characters"),
    "correlation-id-too-long": (envelope(correlationId="c" * 257), "at most 256"),
    "message-type-too-long": (envelope(messageType="T" * 300), "at most 256"),
    "trace-id-too-long": (
        envelope(traceContext={"traceId": "a" * 65, "spanId": "b" * 16}),
        "at most 64",
    ),
    "version-huge": (envelope(version=10**30), "version"),
    "invalid-utf8": (b'{"id": "\xff\xfe"}', "not JSON"),
    "not-json": (b"<xml/>", "not JSON"),
    "lone-surrogate": (envelope("\ud800"), "not JSON"),
    "empty": (b"", "not JSON"),
}


class ReadOnlyDelivery(Delivery):
    """A delivery to decode; settling it is not part of these tests."""

    @property
    def settled(self) -> bool:
        return False

    async def ack(self) -> None:
        raise NotImplementedError

    async def nack(self, *, requeue: bool = True) -> None:
        raise NotImplementedError

    async def reject(self) -> None:
        raise NotImplementedError


def delivery(
    body: bytes, *, message_type: str | None = "ParcelWeighed", **headers: object
) -> Delivery:
    all_headers: Headers = {"x-version": 1}
    all_headers.update(headers)  # type: ignore[arg-type]
    return ReadOnlyDelivery(
        body=body,
        headers=all_headers,
        message_id="m1",
        correlation_id=None,
        message_type=message_type,
        timestamp=None,
        priority=None,
        content_type="application/json",
        reply_to=None,
        redelivered=False,
        exchange="",
        routing_key="",
    )


@pytest.fixture
def registry() -> ContractRegistry:
    registry = ContractRegistry()
    registry.register(ParcelWeighed)
    return registry


@pytest.mark.parametrize("kind", list(HOSTILE_BODIES))
@pytest.mark.parametrize("typed", [True, False], ids=["typed-path", "slow-path"])
def test_a_hostile_body_is_undecodable_with_a_clear_reason(
    registry: ContractRegistry, kind: str, typed: bool
) -> None:
    body, says = HOSTILE_BODIES[kind]
    message = delivery(body, message_type="ParcelWeighed" if typed else None)
    with pytest.raises(DecodeError) as info:
        decode(message, registry)
    assert info.value.reason == "undecodable"
    assert says in str(info.value), str(info.value)[:300]


def test_limits_are_inclusive(registry: ContractRegistry) -> None:
    body = envelope("i" * MAX_FIELD_LENGTH, correlationId="c" * MAX_FIELD_LENGTH)
    assert decode(delivery(body), registry).id == "i" * MAX_FIELD_LENGTH
    nested = json.loads("[" * 150 + "]" * 150)
    assert decode(delivery(envelope(metadata={"x": nested})), registry).id == "evt_1"


def test_a_validator_raising_anything_is_undecodable(registry: ContractRegistry) -> None:
    class Strange(Event, name="ParcelWeighed", version=7):
        parcel_id: str

        def model_post_init(self, context: object) -> None:
            raise LookupError("a contract's own code failed")

    registry.register(Strange)
    with pytest.raises(DecodeError) as info:
        decode(delivery(envelope(version=7), **{"x-version": 7}), registry)
    assert info.value.reason == "undecodable"
    assert "LookupError" in str(info.value)


def test_the_transports_undecodable_marker_refuses_a_good_body(
    registry: ContractRegistry,
) -> None:
    message = delivery(envelope(), **{HEADER_UNDECODABLE: "timestamp: 9 is not a time"})
    with pytest.raises(DecodeError) as info:
        decode(message, registry)
    assert info.value.reason == "undecodable"
    assert "AMQP properties could not be decoded: timestamp: 9 is not a time" in str(info.value)


async def test_hostile_bodies_on_memory_are_dead_lettered_next_to_good_ones(
    memory_url: str, unique: Callable[[str], str]
) -> None:
    handled: list[str] = []

    async def handle(event: ParcelWeighed, ctx: MessageContext) -> None:
        handled.append(ctx.id)

    group = unique("weighing")
    bus = MessageBus(group, memory_url, retry=RetryPolicy.none())
    sub = await bus.subscribe(ParcelWeighed, handle)
    async with bus, MessageBus(unique("scale"), memory_url) as publisher:
        good: list[str] = []
        for kind, (body, _) in HOSTILE_BODIES.items():
            good += [await publisher.publish(ParcelWeighed(parcel_id=kind)) for _ in range(3)]
            await publisher.transport.publish(
                sub.queue_name,
                "",
                OutgoingMessage(
                    body=body,
                    message_id=f"hostile-{kind}",
                    message_type="ParcelWeighed",
                    headers={"x-version": 1},
                    content_type="application/json",
                ),
            )
        dlq = DeadLetterQueue(bus.transport, group, ParcelWeighed)

        await wait_until(lambda: set(good) <= set(handled), what="every good message handled")
        for _ in range(500):
            if await dlq.count() >= len(HOSTILE_BODIES):
                break
            await asyncio.sleep(0.01)
        assert duplicates(handled) == {}
        assert sorted(handled) == sorted(good)
        records = {record.ref: record for record in await dlq.list()}
        assert sorted(records) == sorted(f"hostile-{kind}" for kind in HOSTILE_BODIES)
        for kind, (body, says) in HOSTILE_BODIES.items():
            record = records[f"hostile-{kind}"]
            assert (record.reason, record.attempts) == ("undecodable", 1), kind
            assert record.body == body, kind
            assert says in (record.exception_message or ""), kind
