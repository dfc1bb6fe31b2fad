"""Hostile input costs exactly that message (issue 16, points 1 and 2).

Raw frames with properties the client library cannot decode (a timestamp of
2^63-1, a header key or ``type`` that is not UTF-8, a header table nested 3,000
deep, a routing key that is not UTF-8) and hostile bodies (100,000 ``[``, a
200 KB envelope id, invalid UTF-8, not JSON) are published next to good
messages, on a quorum and on a classic (priority) subscription. Every good
message is handled exactly once, every bad one is in the group's DLQ with
reason ``undecodable``, the consumer's connection is never lost (one
connection, the same one, no connection-lost event), and the DLQ lists every
record.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy, topology
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.topology import QueueType
from tests import brokers
from tests.hostile import (
    FramePublisher,
    int_value,
    longstr_value,
    nested_table,
    properties,
    table,
)
from tests.support import duplicates, wait_until


class HatchBreached(Event):
    hatch_id: str


VERSION_1 = [(b"x-version", int_value(1))]


def envelope(message_id: str, hatch_id: str = "c") -> bytes:
    return json.dumps(
        {
            "id": message_id,
            "correlationId": "cor_hostile",
            "timestamp": "2025-11-15T10:30:00.123Z",
            "serviceName": "hostile-publisher",
            "messageType": "HatchBreached",
            "version": 1,
            "payload": {"hatchId": hatch_id},
        }
    ).encode()


@dataclass(frozen=True)
class Hostile:
    body: bytes
    properties: bytes
    says: str  # in the DLQ record's exception message


def _props(message_id: str, **overrides: object) -> bytes:
    base: dict[str, object] = {
        "headers_raw": table(VERSION_1),
        "message_id": message_id.encode(),
        "timestamp": 1_763_202_600,
        "type_raw": b"HatchBreached",
        "priority": 2,
    }
    base.update(overrides)
    return properties(**base)  # type: ignore[arg-type]


def hostile_inputs() -> dict[str, Hostile]:
    """Kind → what is sent; each message id is ``hostile-<kind>``."""
    cases: dict[str, Hostile] = {}

    def add(kind: str, says: str, *, body: bytes | None = None, **props: object) -> None:
        message_id = f"hostile-{kind}"
        cases[kind] = Hostile(
            body if body is not None else envelope(message_id),
            _props(message_id, **props),
            says,
        )

    # Properties the client cannot decode; the body is a good envelope.
    add("timestamp-2^63-1", "timestamp: 9223372036854775807", timestamp=2**63 - 1)
    add(
        "header-key-not-utf8",
        "key is not UTF-8",
        headers_raw=table([*VERSION_1, (b"\xff\xfe-key", longstr_value("v"))]),
    )
    add("type-not-utf8", "message_type: not UTF-8", type_raw=b"Hatch\xffBreached")
    add(
        "header-nested-3000",
        "headers['deep']: nested deeper than",
        headers_raw=nested_table(3000, extra=VERSION_1),
    )
    # Bodies the envelope decoder must refuse (good properties).
    add("body-100000-brackets", "deeper than", body=b"[" * 100_000)
    add(
        "envelope-id-200kb",
        "at most 256 characters",
        body=envelope("i" * 200_000),
    )
    add("body-invalid-utf8", "not JSON", body=b'{"id": "\xff\xfe\xfd"}')
    add("body-not-json", "not JSON", body=b"<xml>not json</xml>")
    return cases


def bus_connections(vhost: str, name: str) -> list[str]:
    """The broker's names (peer addresses) of the connections named ``name``."""
    return sorted(
        str(c["name"])
        for c in brokers.list_connections(vhost)
        if (c.get("client_properties") or {}).get("connection_name") == name
    )


async def settled_connections(vhost: str, name: str) -> list[str]:
    """The management API lists a connection a moment after it opens: wait for it."""
    deadline = time.monotonic() + 10
    while True:
        names = await asyncio.to_thread(bus_connections, vhost, name)
        if names or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_hostile_frames_and_bodies_cost_only_themselves(
    amqp_url: str, unique: Callable[[str], str], queue_type: QueueType
) -> None:
    vhost = brokers.vhost_from_url(amqp_url)
    group = unique("hostile")
    handled: list[str] = []

    async def handle(event: HatchBreached, ctx: MessageContext) -> None:
        handled.append(ctx.id)

    bus = MessageBus(group, amqp_url, queue_type=queue_type, retry=RetryPolicy.none())
    sub = await bus.subscribe(HatchBreached, handle)
    publisher = MessageBus(unique("dock"), amqp_url)
    hostile = hostile_inputs()
    lost: list[float] = []
    async with bus, publisher, FramePublisher(amqp_url) as raw:
        bus.transport.on_connection_lost(lambda: lost.append(time.monotonic()))
        before = await settled_connections(vhost, group)
        assert len(before) == 1, before
        good: list[str] = []
        priorities = ["low", "normal", "high"]
        for i, (kind, case) in enumerate(hostile.items()):
            for j in range(5):
                good.append(
                    await publisher.publish(
                        HatchBreached(hatch_id=f"{kind}-{j}"), priority=priorities[(i + j) % 3]
                    )
                )
            await raw.publish(sub.queue_name, "", case.body, case.properties)
            # A good envelope published through raw frames too, right behind the bad one.
            ok_id = f"raw-good-{kind}"
            await raw.publish(sub.queue_name, "", envelope(ok_id), _props(ok_id))
            good.append(ok_id)
        # A routing key that is not UTF-8 (the group's exchange is a fanout): the
        # message is good, so it is handled (its routing key, read escaped, is not used).
        rk_id = "raw-good-routing-key-not-utf8"
        await raw.publish_raw_routing_key(
            sub.queue_name, b"key-\xff\xfe", envelope(rk_id), _props(rk_id)
        )
        good.append(rk_id)
        good += [await publisher.publish(HatchBreached(hatch_id=f"tail-{j}")) for j in range(5)]

        dlq = DeadLetterQueue(bus.transport, group, HatchBreached)
        await wait_until(
            lambda: set(good) <= set(handled), timeout=60, what="every good message handled"
        )
        deadline = time.monotonic() + 30
        while await dlq.count() < len(hostile) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # room for a duplicate or a reconnect to show

        assert duplicates(handled) == {}
        assert sorted(handled) == sorted(good), "a hostile message was handled"

        records = await dlq.list()
        by_ref = {record.ref: record for record in records}
        assert sorted(by_ref) == sorted(f"hostile-{kind}" for kind in hostile)
        for kind, case in hostile.items():
            record = by_ref[f"hostile-{kind}"]
            assert record.reason == "undecodable", (kind, record.reason)
            assert record.source == "banyan", kind
            assert record.attempts == 1, kind  # at once: no requeue, no retry
            assert record.body == case.body, kind  # the raw body, byte for byte
            assert case.says in (record.exception_message or ""), (kind, record)
        # What survived of the headers is kept; the marker names what did not.
        key_record = by_ref["hostile-header-key-not-utf8"]
        assert key_record.headers["x-version"] == 1
        assert "\\xff\\xfe-key" in str(key_record.headers["x-banyan-undecodable"])
        assert by_ref["hostile-timestamp-2^63-1"].timestamp is None
        assert by_ref["hostile-type-not-utf8"].headers["x-version"] == 1

        assert lost == [], "the consumer's connection was lost"
        after = await asyncio.to_thread(bus_connections, vhost, group)
        assert after == before, f"the consumer reconnected: {before} -> {after}"
        state = await bus.transport.queue_state(sub.queue_name)
        assert state is not None
        assert state.messages == 0


async def test_the_dlq_lists_records_the_client_could_not_decode(
    amqp_url: str, unique: Callable[[str], str]
) -> None:
    """A message the broker dead-lettered itself (no banyan record) with undecodable
    properties: listing reads it through ``basic.get`` instead of failing on it."""
    group = unique("hostile")

    async def handle(event: HatchBreached) -> None:
        pass

    bus = MessageBus(group, amqp_url)
    await bus.subscribe(HatchBreached, handle)
    async with bus:
        pass  # topology only; nothing consumes
    dlq_name = topology.dead_letter_queue(group, "HatchBreached")
    async with FramePublisher(amqp_url) as raw:
        bad = _props("straight-to-dlq", timestamp=2**63 - 1, type_raw=b"\xffType")
        await raw.publish("", dlq_name, b"\x00raw body", bad)
        await raw.publish("", dlq_name, envelope("fine"), _props("fine"))
    async with MessageBus(unique("operator"), amqp_url) as operator:
        dlq = DeadLetterQueue(operator.transport, group, HatchBreached)
        records = await dlq.list()
        by_ref = {record.ref: record for record in records}
        assert sorted(by_ref) == ["fine", "straight-to-dlq"]
        dead = by_ref["straight-to-dlq"]
        assert dead.body == b"\x00raw body"
        assert dead.timestamp is None
        marker = str(dead.headers["x-banyan-undecodable"])
        assert "timestamp: 9223372036854775807" in marker
        assert "message_type: not UTF-8" in marker
        assert await dlq.count() == 2  # listing gave every record back
