"""Rolling deploys of a new contract version: tolerant reading (a subscriber serving v1
receives v2 as v1 through a downcaster or, for an additive change, by validation) and
publisher-side version pinning. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from banyan_bus import (
    ConfigurationError,
    ContractError,
    Event,
    MessageBus,
    MessageContext,
    RetryPolicy,
    downcaster,
)
from banyan_bus.contracts import routing_key_for
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.envelope import encode
from banyan_bus.topology import ROOT_EXCHANGE
from tests.support import wait_until

NO_RETRY = RetryPolicy.none()


class ShelfStocked(Event):
    shelf_id: str
    count: int


class ShelfStockedV2(Event, name="ShelfStocked", version=2):
    """Additive: one new optional field."""

    shelf_id: str
    count: int
    aisle: str = "?"


class PriceChanged(Event):
    sku: str
    cents: int


class PriceChangedV2(Event, name="PriceChanged", version=2):
    """Not additive (cents became a decimal string and a currency); a downcaster reads it."""

    sku: str
    amount: str
    currency: str


@downcaster(PriceChangedV2, PriceChanged)
def price_v2_to_v1(new: PriceChangedV2) -> PriceChanged:
    euros, _, cents = new.amount.partition(".")
    return PriceChanged(sku=new.sku, cents=int(euros) * 100 + int(cents or 0))


class BinEmptied(Event):
    bin_id: str
    site: str


class BinEmptiedV2(Event, name="BinEmptied", version=2):
    """Not additive (site renamed), and nothing says how to read it as v1."""

    bin_id: str
    location: str


class Seen:
    """Records what a handler received: the payload and the version on the wire."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, int]] = []

    def record(self, event: Event, ctx: MessageContext) -> None:
        self.events.append((event, ctx.version))


async def dlq_record(bus: MessageBus, contract: type[Event], timeout: float = 10.0):
    dlq = DeadLetterQueue(bus.transport, bus.service, contract)
    for _ in range(int(timeout / 0.02)):
        if await dlq.count() == 1:
            break
        await asyncio.sleep(0.02)
    [dead] = await dlq.list()
    return dlq, dead


async def test_an_additive_v2_is_read_as_v1_by_a_v1_subscriber(bus_url: str, unique) -> None:
    seen = Seen()

    async def restock(event: ShelfStocked, ctx: MessageContext) -> None:
        seen.record(event, ctx)

    old = MessageBus(unique("shelves-v1"), bus_url, retry=NO_RETRY)
    await old.subscribe(ShelfStocked, restock)
    publisher = MessageBus(unique("stock-v2"), bus_url)
    async with old, publisher:
        await publisher.publish(ShelfStockedV2(shelf_id="s1", count=4, aisle="7"))
        await publisher.publish(ShelfStocked(shelf_id="s2", count=1))
        await wait_until(lambda: len(seen.events) == 2, what="both events")
    by_shelf = {e.shelf_id: (e, v) for e, v in seen.events}
    assert by_shelf["s1"] == (ShelfStocked(shelf_id="s1", count=4), 2)
    assert by_shelf["s2"] == (ShelfStocked(shelf_id="s2", count=1), 1)


async def test_a_downcaster_reads_a_v2_that_does_not_validate_as_v1(bus_url: str, unique) -> None:
    seen = Seen()

    async def reprice(event: PriceChanged, ctx: MessageContext) -> None:
        seen.record(event, ctx)

    old = MessageBus(unique("pricing-v1"), bus_url, retry=NO_RETRY)
    await old.subscribe(PriceChanged, reprice)
    publisher = MessageBus(unique("catalog-v2"), bus_url)
    async with old, publisher:
        await publisher.publish(PriceChangedV2(sku="k1", amount="12.50", currency="EUR"))
        await wait_until(lambda: len(seen.events) == 1, what="the downcast event")
    assert seen.events == [(PriceChanged(sku="k1", cents=1250), 2)]


async def test_an_unreadable_v2_is_dead_lettered_with_what_was_tried_and_replays_after_upgrade(
    bus_url: str, unique
) -> None:
    group = unique("bins")
    v1_seen: list[BinEmptied] = []
    v2_seen: list[BinEmptiedV2] = []

    async def on_v1(event: BinEmptied) -> None:
        v1_seen.append(event)

    async def on_v2(event: BinEmptiedV2) -> None:
        v2_seen.append(event)

    old = MessageBus(group, bus_url, retry=NO_RETRY)
    await old.subscribe(BinEmptied, on_v1)
    publisher = MessageBus(unique("bins-pub"), bus_url)
    async with old, publisher:
        message_id = await publisher.publish(BinEmptiedV2(bin_id="b1", location="dock"))
        dlq, dead = await dlq_record(old, BinEmptied)
    assert v1_seen == []
    assert dead.reason == "unknown-version"
    assert dead.message_id == message_id
    assert dead.version == 2
    text = dead.exception_message or ""
    assert "served versions: [1]" in text
    assert "v1 by validation: site: Field required" in text

    upgraded = MessageBus(group, bus_url, retry=NO_RETRY)  # the same group, now serving v2
    await upgraded.subscribe(BinEmptied, on_v1)
    await upgraded.subscribe(BinEmptiedV2, on_v2)
    async with upgraded:
        dlq = DeadLetterQueue(upgraded.transport, group, BinEmptied)
        result = await dlq.replay()
        assert result.replayed == [message_id]
        await wait_until(lambda: len(v2_seen) == 1, what="the replayed event")
    assert v2_seen == [BinEmptiedV2(bin_id="b1", location="dock")]
    assert v1_seen == []


async def test_a_version_this_service_has_never_heard_of_is_read_as_the_one_it_serves(
    bus_url: str, unique
) -> None:
    """The real rolling deploy: the subscriber's code has no v7 contract at all."""
    seen = Seen()

    async def restock(event: ShelfStocked, ctx: MessageContext) -> None:
        seen.record(event, ctx)

    old = MessageBus(unique("shelves-old"), bus_url, retry=NO_RETRY)
    await old.subscribe(ShelfStocked, restock)
    async with old:
        for shelf, payload in (("s7", {"shelfId": "s7", "count": 2, "bay": 1}), ("bad", {})):
            body = (
                b'{"id":"evt_v7_' + shelf.encode() + b'","timestamp":"2025-11-15T10:30:00.123Z",'
                b'"messageType":"ShelfStocked","version":7,"payload":'
                + (b'{"shelfId":"s7","count":2,"bay":1}' if payload else b'{"shelfId":"x"}')
                + b"}"
            )
            outgoing = dataclasses.replace(
                encode(ShelfStocked(shelf_id="x", count=0), service_name="future"),
                body=body,
                message_id=f"evt_v7_{shelf}",
                headers={"x-version": 7},
            )
            await old.transport.publish(ROOT_EXCHANGE, routing_key_for("ShelfStocked"), outgoing)
        await wait_until(lambda: len(seen.events) == 1, what="the v7 event read as v1")
        _, dead = await dlq_record(old, ShelfStocked)
    assert seen.events == [(ShelfStocked(shelf_id="s7", count=2), 7)]
    assert dead.message_id == "evt_v7_bad"
    assert dead.reason == "unknown-version"
    assert "v1 by validation: count: Field required" in (dead.exception_message or "")


async def test_a_pinned_publisher_emits_the_older_version(bus_url: str, unique) -> None:
    shelves = Seen()
    prices = Seen()

    async def restock(event: ShelfStocked, ctx: MessageContext) -> None:
        shelves.record(event, ctx)

    async def reprice(event: PriceChanged, ctx: MessageContext) -> None:
        prices.record(event, ctx)

    subscriber = MessageBus(unique("store"), bus_url, retry=NO_RETRY)
    await subscriber.subscribe(ShelfStocked, restock)
    await subscriber.subscribe(PriceChanged, reprice)
    publisher = MessageBus(
        unique("pinned"), bus_url, publish_versions={ShelfStockedV2: 1, "PriceChanged": 1}
    )
    async with subscriber, publisher:
        await publisher.publish(ShelfStockedV2(shelf_id="s1", count=3, aisle="9"))
        await publisher.publish(ShelfStockedV2, {"shelfId": "s2", "count": 5})
        await publisher.publish(PriceChangedV2(sku="k", amount="3.05", currency="EUR"))
        await wait_until(
            lambda: len(shelves.events) == 2 and len(prices.events) == 1, what="pinned events"
        )
    # version 1 on the wire: no tolerant reading was needed
    assert sorted(shelves.events, key=lambda seen: seen[0].shelf_id) == [
        (ShelfStocked(shelf_id="s1", count=3), 1),
        (ShelfStocked(shelf_id="s2", count=5), 1),
    ]
    assert prices.events == [(PriceChanged(sku="k", cents=305), 1)]


async def test_a_pin_that_cannot_be_honoured_says_so_and_sends_nothing(
    bus_url: str, unique
) -> None:
    seen: list[BinEmptied] = []

    async def on_v1(event: BinEmptied) -> None:
        seen.append(event)

    subscriber = MessageBus(unique("bins-sub"), bus_url, retry=NO_RETRY)
    await subscriber.subscribe(BinEmptied, on_v1)
    publisher = MessageBus(unique("bins-pinned"), bus_url, publish_versions={BinEmptied: 1})
    async with subscriber, publisher:
        with pytest.raises(ContractError) as info:
            await publisher.publish(BinEmptiedV2(bin_id="b", location="dock"))
        await publisher.publish(BinEmptied(bin_id="ok", site="north"))
        await wait_until(lambda: len(seen) == 1)
        await asyncio.sleep(0.1)
    text = str(info.value)
    assert "pins BinEmptied to v1" in text
    assert "BinEmptied v2 cannot be read as v1" in text
    assert "@downcaster(BinEmptiedV2, BinEmptied)" in text
    assert [e.bin_id for e in seen] == ["ok"]


def test_a_pin_to_an_unregistered_version_is_refused_when_the_bus_is_built() -> None:
    with pytest.raises(ConfigurationError, match=r"ShelfStocked to version 5.*\[1, 2\]"):
        MessageBus("pinned", "memory://", publish_versions={"ShelfStocked": 5})
    with pytest.raises(ConfigurationError, match="NoSuchThing"):
        MessageBus("pinned", "memory://", publish_versions={"NoSuchThing": 1})
