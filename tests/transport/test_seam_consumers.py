"""Consumers at the seam: delivery in its own task, prefetch, round robin, single
active consumer. Runs on memory:// and on RabbitMQ."""

from __future__ import annotations

import asyncio

import pytest

from banyan_bus.errors import TopologyError
from banyan_bus.transport.base import Delivery, Transport
from tests.transport.seam import TIMEOUT, Collector, msg


async def test_publish_does_not_run_consumers_inline(transport: Transport, on_memory: bool) -> None:
    t = transport
    await t.declare_queue("q")
    tasks: list[asyncio.Task[object] | None] = []
    seen = Collector()

    async def record(delivery: Delivery) -> None:
        tasks.append(asyncio.current_task())
        await seen(delivery)

    await t.consume("q", record, prefetch=10)
    await t.publish("", "q", msg("a"))
    if on_memory:  # on RabbitMQ the delivery may overtake the publisher confirm
        assert seen.deliveries == []
    await seen.wait_for(1)
    assert tasks[0] is not asyncio.current_task()  # the callback ran in a task of its own
    assert seen.bodies == [b"a"]
    assert seen.deliveries[0].exchange == ""
    assert seen.deliveries[0].routing_key == "q"


async def test_prefetch_bounds_unacked_deliveries(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q")
    for n in range(20):
        await t.publish("", "q", msg(str(n)))
    in_flight = 0
    peak = 0
    done = asyncio.Event()
    handled: list[bytes] = []

    async def slow(delivery: Delivery) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        handled.append(delivery.body)
        await delivery.ack()
        if len(handled) == 20:
            done.set()

    await t.consume("q", slow, prefetch=3)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    assert peak == 3
    assert handled == [str(n).encode() for n in range(20)]

    await t.declare_queue("q2")
    held = Collector(ack=False)
    for n in range(5):
        await t.publish("", "q2", msg(str(n)))
    await t.consume("q2", held, prefetch=2)
    await held.wait_for(2)
    await asyncio.sleep(0.05)
    assert len(held.deliveries) == 2  # the rest wait for a free slot
    await held.deliveries[0].ack()
    await held.wait_for(3)


async def test_round_robin_between_consumers(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q")
    consumers = [Collector() for _ in range(3)]
    for c in consumers:
        await t.consume("q", c, prefetch=10)
    for n in range(9):
        await t.publish("", "q", msg(str(n)))
    for c in consumers:
        await c.wait_for(3)
    assert [c.bodies for c in consumers] == [
        [b"0", b"3", b"6"],
        [b"1", b"4", b"7"],
        [b"2", b"5", b"8"],
    ]


async def test_single_active_consumer_fails_over_on_cancel(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-single-active-consumer": True})
    first, second = Collector(), Collector()
    first_consumer = await t.consume("q", first, prefetch=5)
    await t.consume("q", second, prefetch=5)
    for n in range(4):
        await t.publish("", "q", msg(str(n)))
    await first.wait_for(4)
    assert second.deliveries == []
    await first_consumer.cancel()
    await t.publish("", "q", msg("after"))
    await second.wait_for(1)
    assert second.bodies == [b"after"]
    state = await t.queue_state("q")
    assert state is not None
    assert state.consumers == 1


async def test_consuming_a_missing_queue_is_refused_and_the_transport_goes_on(
    transport: Transport,
) -> None:
    t = transport
    seen = Collector()
    for _ in range(3):  # no channel (RabbitMQ) or consumer left behind by a refusal
        with pytest.raises(TopologyError, match=r"queue 'nowhere' does not exist"):
            await t.consume("nowhere", seen, prefetch=10)
    await t.declare_queue("q")
    await t.consume("q", seen, prefetch=10)
    await t.publish("", "q", msg("after"))
    await seen.wait_for(1)
    assert seen.bodies == [b"after"]
    await asyncio.sleep(0.2)  # a refused consumer's channel would not come back either
    assert seen.bodies == [b"after"]
