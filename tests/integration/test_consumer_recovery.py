"""The AMQP consumer renews itself: after the broker cancels it (its queue was deleted)
it consumes again once the queue is back, and nothing published afterwards is missed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika

from banyan_bus import Event, MessageBus
from banyan_bus.topology import group_exchange
from tests.support import duplicates, eventually, wait_until


class BuoyDrifted(Event):
    buoy_id: str


def _not_ready(bus: MessageBus) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not (await bus.health()).ready

    return check


async def test_a_consumer_cancelled_by_the_broker_comes_back_with_its_queue(
    amqp_url: str,
) -> None:
    seen: list[str] = []

    async def handle(event: BuoyDrifted) -> None:
        seen.append(event.buoy_id)

    async def nothing(event: BuoyDrifted) -> None:  # pragma: no cover - never delivered to
        raise AssertionError("the re-declaring bus consumed")

    queue = group_exchange("harbour", "BuoyDrifted")
    bus = MessageBus("harbour", amqp_url)
    await bus.subscribe(BuoyDrifted, handle)
    async with bus:
        await bus.publish(BuoyDrifted(buoy_id="before"))
        await wait_until(lambda: seen == ["before"], what="the first event")

        conn = await aio_pika.connect(amqp_url)
        async with conn:
            channel = await conn.channel()
            await channel.queue_delete(queue)  # the broker cancels our consumer
        # Let the broker's basic.cancel arrive before anything re-declares the queue: on
        # RabbitMQ 3.10 a quorum queue deleted and declared again within ~50 ms never
        # sends it (raw aiormq: 0 cancels in 10 tries at once, 6 of 6 at 50 ms; classic
        # queues 10 of 10), and a consumer nobody told it was cancelled cannot come back.
        await eventually(_not_ready(bus), what="the bus to see its consumer cancelled")
        # Re-declare the topology as a redeploy would, then leave the queue to the first bus.
        again = MessageBus("harbour", amqp_url)
        await again.subscribe(BuoyDrifted, nothing)
        await again.start()
        await again.stop()

        ids = [f"after-{i}" for i in range(20)]
        for buoy_id in ids:
            await bus.publish(BuoyDrifted(buoy_id=buoy_id))
        await wait_until(lambda: len(seen) == 21, timeout=15, what="20 events after")
    assert sorted(seen[1:]) == sorted(ids)
    assert not duplicates(seen)
