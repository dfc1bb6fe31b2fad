"""Bad input and back-pressure: poison never stops a consumer, nothing is dropped silently.

Poison is sent the way a foreign or broken publisher would send it: raw bytes with
aio-pika straight to the group's exchange on RabbitMQ, an ``OutgoingMessage``
through a transport of its own on memory://. Every test runs on both.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import pamqp.encode as pamqp_encode
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banyan_bus import BusCapacityExceeded, Event, MessageBus, MessageContext, RetryPolicy
from banyan_bus.bus import make_transport
from banyan_bus.dlq import DeadLetter, DeadLetterQueue
from banyan_bus.topology import QueueType
from banyan_bus.transport.base import Headers, HeaderValue, OutgoingMessage, Transport
from tests.support import duplicates, eventually, wait_until

NO_RETRY = RetryPolicy.none()
MiB = 1024 * 1024


class CrateSealed(Event):
    crate_id: str
    note: str = ""


class CrateSealedV2(Event, name="CrateSealed", version=2):
    """Not additive (crate_id renamed): a v1 subscriber cannot read it (tolerant reading)."""

    crate_ref: str
    seal: str = "wax"


class CrateLost(Event):
    crate_id: str


class RawPublisher:
    """Publishes bytes and properties as given, bypassing the bus and its checks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._transport: Transport | None = None

    async def __aenter__(self) -> Self:
        if self.url.startswith("amqp"):
            self._connection = await aio_pika.connect(self.url, timeout=10)
            self._channel = await self._connection.channel(publisher_confirms=True)
        else:
            self._transport = make_transport(self.url, name="raw")
            await self._transport.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._transport is not None:
            await self._transport.close()

    async def publish(
        self,
        exchange: str,
        body: bytes,
        *,
        message_id: str | None = None,
        message_type: str | None = None,
        headers: Headers | None = None,
        content_type: str | None = None,
    ) -> None:
        if self._channel is not None:
            target = await self._channel.get_exchange(exchange, ensure=False)
            await target.publish(
                aio_pika.Message(
                    body,
                    headers=headers or {},  # type: ignore[arg-type]  # any AMQP table value
                    message_id=message_id,
                    type=message_type,
                    content_type=content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="",
                timeout=10,
            )
        else:
            assert self._transport is not None
            await self._transport.publish(
                exchange,
                "",
                OutgoingMessage(
                    body=body,
                    message_id=message_id,
                    message_type=message_type,
                    headers=dict(headers or {}),
                    content_type=content_type or "",
                ),
            )


def envelope(
    message_id: str,
    message_type: str,
    version: object,
    payload: object,
    timestamp: object = "2025-11-15T10:30:00.123Z",
) -> bytes:
    return json.dumps(
        {
            "id": message_id,
            "correlationId": "cor_raw",
            "timestamp": timestamp,
            "serviceName": "raw-publisher",
            "messageType": message_type,
            "version": version,
            "payload": payload,
        }
    ).encode()


@dataclass(frozen=True)
class Poison:
    """One kind of bad input: how it is sent and the DLQ reason it must get."""

    body: bytes
    reason: str
    message_type: str | None = None
    headers: Headers = field(default_factory=dict)


POISON: dict[str, Poison] = {
    "not-json": Poison(b"\x00\x9f\xfe{ this is not json", "undecodable"),
    "json-not-an-envelope": Poison(b'{"hello": "world", "n": [1, 2]}', "undecodable"),
    "payload-fails-validation": Poison(
        envelope("poison-payload-fails-validation", "CrateSealed", 1, {"note": "no crateId"}),
        "validation-failed",
        "CrateSealed",
        {"x-version": 1},
    ),
    "unknown-message-type": Poison(
        envelope("poison-unknown-message-type", "CrateTeleported", 1, {"crateId": "c"}),
        "unknown-message-type",
        "CrateTeleported",
        {"x-version": 1},
    ),
    "another-contracts-type": Poison(
        envelope("poison-another-contracts-type", "CrateLost", 1, {"crateId": "c"}),
        "unknown-message-type",
        "CrateLost",
        {"x-version": 1},
    ),
    "unknown-version": Poison(
        envelope("poison-unknown-version", "CrateSealed", 9, {"crateRef": "c"}),
        "unknown-version",
        "CrateSealed",
        {"x-version": 9},
    ),
    "version-no-handler-serves": Poison(
        envelope("poison-version-no-handler-serves", "CrateSealed", 2, {"crateRef": "c"}),
        "unknown-version",
        "CrateSealed",
        {"x-version": 2},
    ),
    "far-over-the-size-limit": Poison(
        envelope(
            "poison-far-over-the-size-limit",
            "CrateSealed",
            1,
            {"crateId": "c", "note": "x" * (2 * MiB)},
        ),
        "too-large",
        "CrateSealed",
        {"x-version": 1},
    ),
}


@pytest.mark.parametrize(
    "kind",
    [kind for kind in POISON],
)
async def test_poison_goes_to_the_dlq_while_the_consumer_goes_on(
    bus_url: str, unique: Callable[[str], str], kind: str
) -> None:
    poison = POISON[kind]
    poison_id = f"poison-{kind}"
    handled: list[str] = []

    async def handle(event: CrateSealed, ctx: MessageContext) -> None:
        handled.append(ctx.id)

    group = unique("packing")
    bus = MessageBus(group, bus_url)  # the default retry policy: poison must skip it
    sub = await bus.subscribe(CrateSealed, handle)
    publisher = MessageBus(unique("dock"), bus_url)
    async with bus, publisher, RawPublisher(bus_url) as raw:
        valid = [await publisher.publish(CrateSealed(crate_id=f"c{i}")) for i in range(50)]
        await raw.publish(
            sub.queue_name,
            poison.body,
            message_id=poison_id,
            message_type=poison.message_type,
            headers=poison.headers,
            content_type="application/json",
        )
        valid += [await publisher.publish(CrateSealed(crate_id=f"c{i}")) for i in range(50, 100)]
        dlq = DeadLetterQueue(bus.transport, group, CrateSealed)

        async def settled() -> bool:
            if not set(valid) <= set(handled):
                return False
            return poison_id in handled or await dlq.count() >= 1

        await eventually(settled, what=f"100 valid handled and the {kind} poison settled")
        assert poison_id not in handled, f"the {kind} poison was handled"
        assert duplicates(handled) == {}
        assert sorted(handled) == sorted(valid)
        [dead] = await dlq.list()
        assert dead.reason == poison.reason
        assert dead.source == "banyan"
        assert dead.ref == poison_id
        assert dead.body == poison.body  # byte for byte
        assert dead.attempts == 1  # straight to the DLQ: retrying cannot fix it
        assert dead.exception_type == "DecodeError"
        assert dead.exception_message
        assert dead.handler is None
        assert dead.group == group
        queue = await bus.transport.queue_state(sub.queue_name)
        assert queue is not None
        assert queue.messages == 0


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_full_queue_refuses_the_publish_and_keeps_what_it_has(
    bus_url: str,
    unique: Callable[[str], str],
    queue_type: QueueType,
    request: pytest.FixtureRequest,
) -> None:
    group = unique("packing")
    handled: list[str] = []

    async def handle(event: CrateSealed, ctx: MessageContext) -> None:
        handled.append(ctx.id)

    declaring = MessageBus(group, bus_url, queue_type=queue_type)
    sub = await declaring.subscribe(CrateSealed, handle, max_length=10)
    async with declaring:
        pass  # the queue exists; its consumer is stopped
    publisher = MessageBus(unique("dock"), bus_url)
    async with publisher:
        kept = [await publisher.publish(CrateSealed(crate_id=f"c{i}")) for i in range(10)]
        if queue_type == "quorum":
            # RabbitMQ's quorum queues check the limit before the enqueue, so one more
            # fits (README, "Back-pressure"); memory:// emulates that.
            kept.append(await publisher.publish(CrateSealed(crate_id="c10")))
        with pytest.raises(BusCapacityExceeded):
            await publisher.publish(CrateSealed(crate_id="c11"))
        state = await publisher.transport.queue_state(sub.queue_name)
        assert state is not None
        assert state.messages == len(kept)
    consumer = MessageBus(group, bus_url, queue_type=queue_type)
    await consumer.subscribe(CrateSealed, handle, max_length=10)
    async with consumer:
        await wait_until(lambda: len(handled) >= len(kept), what="the kept events")
        await asyncio.sleep(0.2)
    assert sorted(handled) == sorted(kept)


async def test_capacity_error_says_where_the_message_went(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    """memory:// knows which queue refused; RabbitMQ's nack does not say, so on amqp the
    error names the exchange and routing key the refused message was published with."""

    async def handle(event: CrateSealed) -> None:
        pass

    declaring = MessageBus(unique("packing"), bus_url, queue_type="classic")
    sub = await declaring.subscribe(CrateSealed, handle, max_length=1)
    async with declaring:
        pass
    async with MessageBus(unique("dock"), bus_url) as publisher:
        await publisher.publish(CrateSealed(crate_id="c0"))
        with pytest.raises(BusCapacityExceeded) as info:
            await publisher.publish(CrateSealed(crate_id="c1"))
    text = str(info.value)
    assert "'exchange.platform.events'" in text
    assert "'cratesealed'" in text
    if bus_url.startswith("memory"):
        assert sub.queue_name in text


# -- property: whatever arrives, it is handled or dead-lettered, exactly once ----------------

# Headers the engine reads, so random values hit its parsing. (``x-banyan-handled`` gets
# random strings only: a list naming the handler is the engine's retry-resume marker and
# makes it skip that handler by design.)
ENGINE_HEADERS = [
    "x-version",
    "x-attempt",
    "x-banyan-handled",
    "x-banyan-delay",
    "x-banyan-first-failure",
    "x-banyan-reason",
    "x-death",
    "x-delivery-count",
    "x-first-death-queue",
    "x-partition-key",
    "traceparent",
]
INPUT_HEADER = "x-test-input"


def header_maps(*, amqp: bool) -> st.SearchStrategy[dict[str, HeaderValue]]:
    """Random AMQP header tables, as far as aio-pika can send them: floats only in single
    precision (pamqp writes every float as a 32-bit 'f'), bytes only as bytearray.
    ``test_a_header_from_a_foreign_client_does_not_wedge_dead_lettering`` covers the rest."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        # RabbitMQ cannot parse an infinite or NaN float header (its channel crashes).
        st.floats(width=32, allow_nan=False, allow_infinity=False) if amqp else st.floats(),
        st.text(max_size=20),
        # pamqp sends only bytearray as bytes ('x'); see the foreign-header test for bytes.
        st.binary(max_size=20).map(bytearray) if amqp else st.binary(max_size=20),
        st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)),
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )
    return st.dictionaries(
        st.one_of(st.sampled_from(ENGINE_HEADERS), st.text(min_size=1, max_size=12)),
        values,
        max_size=5,
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
good_payloads = st.fixed_dictionaries(
    {"crateId": st.text(max_size=10)},
    optional={"note": st.sampled_from(["", "fragile", "boom"]), "seal": st.just("tin")},
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    good_payloads.map(lambda v: json.dumps(v).encode()),  # a foreign publisher's bare payload
    st.builds(
        envelope,
        message_id=st.text(max_size=12),
        message_type=st.sampled_from(["CrateSealed", "CrateLost", "CrateTeleported", ""]),
        version=st.one_of(st.integers(-2, 3), st.text(max_size=2), st.none()),
        payload=st.one_of(good_payloads, json_values),
        timestamp=st.sampled_from(["2025-11-15T10:30:00.123Z", "yesterday", 12, None]),
    ),
)
amqp_types = st.one_of(
    st.none(),
    st.sampled_from(["CrateSealed", "CrateLost", "CrateTeleported"]),
    st.text(max_size=30),
)


@dataclass(frozen=True)
class RawInput:
    body: bytes
    message_type: str | None
    message_id: str | None
    headers: dict[str, HeaderValue]


def raw_inputs(*, amqp: bool) -> st.SearchStrategy[RawInput]:
    return st.builds(
        RawInput,
        body=bodies,
        message_type=amqp_types,
        message_id=st.one_of(st.none(), st.text(max_size=20)),
        headers=header_maps(amqp=amqp),
    )


def _input_of(headers: Any) -> str:
    value = headers.get(INPUT_HEADER)
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_every_input_is_accounted_for(url: str, group: str, inputs: list[RawInput]) -> None:
    """Send ``inputs`` raw to a consumer; each must be handled or dead-lettered, once."""
    handled: list[str] = []

    async def handle(event: CrateSealed, ctx: MessageContext) -> None:
        if event.note == "boom":
            raise RuntimeError("boom")  # the handler-failed path, straight to the DLQ
        handled.append(_input_of(ctx.headers))

    bus = MessageBus(group, url)
    sub = await bus.subscribe(CrateSealed, handle, retry=NO_RETRY)
    with structlog.testing.capture_logs() as logs:
        async with bus, RawPublisher(url) as raw:
            for i, item in enumerate(inputs):
                await raw.publish(
                    sub.queue_name,
                    item.body,
                    message_id=item.message_id,
                    message_type=item.message_type,
                    headers={**item.headers, INPUT_HEADER: f"in-{i}"},
                )
            # The consumer is still alive after all of that:
            await bus.publish(CrateSealed(crate_id="last"), headers={INPUT_HEADER: "sentinel"})
            dlq = DeadLetterQueue(bus.transport, group, CrateSealed)
            total = len(inputs) + 1

            async def all_settled() -> bool:
                return len(handled) + await dlq.count() >= total

            await eventually(all_settled, what=f"{total} inputs handled or dead-lettered")
            assert await bus.wait_idle(timeout=5)
            dead = await dlq.list(limit=total + 10)
            queue = await bus.transport.queue_state(sub.queue_name)
    dead_inputs = [_input_of(d.headers) for d in dead]
    expected = Counter([f"in-{i}" for i in range(len(inputs))] + ["sentinel"])
    assert Counter(handled) + Counter(dead_inputs) == expected
    assert "sentinel" in handled
    assert all(isinstance(d, DeadLetter) and d.source == "banyan" for d in dead)
    assert queue is not None
    assert queue.messages == 0
    crashes = [e for e in logs if e.get("event") in ("consumer_error", "settle_failed")]
    assert crashes == []


PROPERTY_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=40, **PROPERTY_SETTINGS)
@given(inputs=st.lists(raw_inputs(amqp=False), min_size=1, max_size=12))
async def test_random_input_on_memory_is_handled_or_dead_lettered(
    memory_url: str, unique: Callable[[str], str], inputs: list[RawInput]
) -> None:
    await check_every_input_is_accounted_for(memory_url, unique("prop"), inputs)


@settings(max_examples=6, **PROPERTY_SETTINGS)
@given(inputs=st.lists(raw_inputs(amqp=True), min_size=1, max_size=8))
async def test_random_input_on_rabbitmq_is_handled_or_dead_lettered(
    amqp_url: str, unique: Callable[[str], str], inputs: list[RawInput]
) -> None:
    await check_every_input_is_accounted_for(amqp_url, unique("prop"), inputs)


FOREIGN_HEADERS: dict[str, HeaderValue] = {
    # Other clients (Java, .NET, Go) send float headers as 64-bit doubles and may send
    # strings that are not UTF-8. aio-pika decodes them (to float, to bytes) but cannot
    # send them back: it writes every float as a 32-bit 'f' and has no encoding for bytes.
    "double-beyond-float32": 1e300,
    "non-utf8-long-string": b"\xff\xfe caf\xe9",
}


WRITABLE_FORM = {
    "double-beyond-float32": "1e+300",
    "non-utf8-long-string": "\\xff\\xfe caf\\xe9",
}


def foreign_encoder(original: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """pamqp's table-value encoder as a Java client would write these two values."""

    def encode(value: Any) -> bytes:
        if isinstance(value, float):
            return b"d" + pamqp_encode.double(value)
        if isinstance(value, bytes):
            return b"S" + len(value).to_bytes(4, "big") + value
        return original(value)

    return encode


@pytest.mark.parametrize("header", list(FOREIGN_HEADERS))
async def test_a_header_from_a_foreign_client_does_not_wedge_dead_lettering(
    amqp_url: str, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    handled: list[str] = []

    async def handle(event: CrateSealed, ctx: MessageContext) -> None:
        handled.append(ctx.id)

    group = unique("packing")
    declaring = MessageBus(group, amqp_url)
    sub = await declaring.subscribe(CrateSealed, handle)
    async with declaring:
        pass
    with monkeypatch.context() as patch:  # only while no consumer of ours is running
        patch.setattr(
            pamqp_encode,
            "encode_table_value",
            foreign_encoder(pamqp_encode.encode_table_value),
        )
        async with RawPublisher(amqp_url) as raw:
            await raw.publish(
                sub.queue_name,
                b"not json",
                message_id="foreign",
                headers={"x-foreign": FOREIGN_HEADERS[header]},
            )
    consumer = MessageBus(group, amqp_url)
    await consumer.subscribe(CrateSealed, handle)
    with structlog.testing.capture_logs() as logs:
        async with consumer:
            dlq = DeadLetterQueue(consumer.transport, group, CrateSealed)

            async def dead_lettered() -> bool:
                return await dlq.count() == 1

            await eventually(dead_lettered, timeout=5, what="the message in the DLQ")
            [dead] = await dlq.list()
    assert dead.ref == "foreign"
    # Kept, in the one form AMQP clients can write back: as text.
    assert dead.headers["x-foreign"] == WRITABLE_FORM[header]
    # Straight there with our record, not after 20 redeliveries through the engine's
    # error path:
    assert [e["event"] for e in logs if e.get("event") == "consumer_error"] == []
    assert dead.reason == "undecodable"
