"""Coalesced settlement on a real RabbitMQ: batched acks never hold back, lose or mix up.

The transport writes the acks, nacks and rejects of one loop turn as one frame
(``transport/amqp_settle.py``). These tests check what the broker makes of it: every
message settled once, a slow delivery does not hold the prefetch window, nacks land
before the multiple acks that pass them, and a clean stop sends everything it handled.
"""

from __future__ import annotations

import asyncio
import random

import aio_pika

from banyan_bus import Event, MessageBus, RetryPolicy
from banyan_bus.topology import group_exchange
from tests.support import duplicates, wait_until


class ToteSorted(Event):
    crate_id: str
    slow: bool = False
    fail: bool = False


async def _depth(url: str, queue: str) -> tuple[int, int]:
    """(ready + unacked messages, consumers) of ``queue``, read by a passive declare."""
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        result = q.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)


async def test_a_slow_delivery_does_not_hold_back_the_prefetch_window(amqp_url: str) -> None:
    release = asyncio.Event()
    fast: list[str] = []

    async def handle(event: ToteSorted) -> None:
        if event.slow:
            await release.wait()
        else:
            fast.append(event.crate_id)

    bus = MessageBus("depot", amqp_url)
    await bus.subscribe(ToteSorted, handle, prefetch=5, concurrency=5)
    async with bus:
        await bus.publish(ToteSorted(crate_id="slow", slow=True))
        ids = [f"p{i}" for i in range(200)]
        for crate_id in ids:
            await bus.publish(ToteSorted(crate_id=crate_id))
        # With prefetch 5 all 200 can only get through if their acks go out while the
        # first delivery is still unacknowledged.
        await wait_until(lambda: len(fast) == 200, timeout=30, what="200 fast deliveries")
        release.set()
        await bus.wait_idle(10)
    assert sorted(fast) == sorted(ids)
    assert not duplicates(fast)
    assert await _depth(amqp_url, group_exchange("depot", "ToteSorted")) == (0, 0)


async def test_mixed_acks_and_dead_letters_settle_each_message_once(amqp_url: str) -> None:
    handled: list[str] = []
    failed: list[str] = []

    async def handle(event: ToteSorted) -> None:
        await asyncio.sleep(random.random() * 0.01)  # finish out of order
        if event.fail:
            failed.append(event.crate_id)
            raise RuntimeError("scanner jammed")
        handled.append(event.crate_id)

    bus = MessageBus("depot", amqp_url, retry=RetryPolicy.none())
    await bus.subscribe(ToteSorted, handle, prefetch=100, concurrency=100)
    events = [ToteSorted(crate_id=f"p{i}", fail=i % 7 == 0) for i in range(700)]
    async with bus:
        ids = await asyncio.gather(*(bus.publish(e) for e in events))
        await wait_until(lambda: len(handled) + len(failed) == 700, timeout=60, what="700")
        await bus.wait_idle(10)
        dead = await bus.dlq("depot", ToteSorted).list(limit=1000)
    assert len(handled) == 600
    assert not duplicates(handled)
    assert len(failed) == 100
    assert not duplicates(failed)
    failing_ids = {i for i, e in zip(ids, events, strict=True) if e.fail}
    assert sorted(d.message_id or "" for d in dead) == sorted(failing_ids)
    assert {d.reason for d in dead} == {"handler-failed"}
    assert await _depth(amqp_url, group_exchange("depot", "ToteSorted")) == (0, 0)


async def test_a_clean_stop_sends_the_acks_of_everything_handled(amqp_url: str) -> None:
    handled: list[str] = []

    async def handle(event: ToteSorted) -> None:
        handled.append(event.crate_id)

    publisher = MessageBus("depot", amqp_url)
    await publisher.subscribe(ToteSorted, handle)  # declares the queue; not started
    async with publisher:
        pass
    sender = MessageBus("sender", amqp_url)
    async with sender:
        await asyncio.gather(*(sender.publish(ToteSorted(crate_id=f"p{i}")) for i in range(500)))
    for _ in range(3):  # start, take a part of the backlog, stop at once
        bus = MessageBus("depot", amqp_url)
        await bus.subscribe(ToteSorted, handle, prefetch=50, concurrency=50)
        async with bus:
            target = len(handled) + 50
            await wait_until(lambda t=target: len(handled) >= t, timeout=30, what="50 more")
    bus = MessageBus("depot", amqp_url)
    await bus.subscribe(ToteSorted, handle, prefetch=50, concurrency=50)
    async with bus:
        await wait_until(lambda: len(handled) >= 500, timeout=30, what="the rest")
        await bus.wait_idle(10)
    # A stop after handling sends the acks first: nothing handled comes back again.
    assert sorted(handled) == sorted(f"p{i}" for i in range(500)), duplicates(handled)
    assert await _depth(amqp_url, group_exchange("depot", "ToteSorted")) == (0, 0)
