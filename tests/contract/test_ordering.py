"""Per-key ordering (consistent hash + single active consumer + per-key chains) and
effectively-once handlers with the in-memory store. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy
from tests.support import Gauge, wait_until


class ShipmentMoved(Event, partition_key="shipment_id"):
    shipment_id: str
    seq: int


class ReceiptPrinted(Event):
    receipt_id: str


def interleaved(keys: int, per_key: int) -> list[ShipmentMoved]:
    return [
        ShipmentMoved(shipment_id=f"s{k:02d}", seq=i) for i in range(per_key) for k in range(keys)
    ]


async def test_per_key_order_across_two_instances(bus_url: str, unique) -> None:
    service = unique("tracker")
    handled: dict[str, list[int]] = defaultdict(list)
    gauge = Gauge()
    rng = random.Random(7)

    async def handle(event: ShipmentMoved) -> None:
        with gauge:
            await asyncio.sleep(rng.uniform(0, 0.005))
        handled[event.shipment_id].append(event.seq)

    instances = [MessageBus(service, bus_url) for _ in range(2)]
    for bus in instances:
        await bus.subscribe(ShipmentMoved, handle, ordered=True, concurrency=8)
    publisher = MessageBus(unique("publisher"), bus_url)
    events = interleaved(50, 40)
    async with instances[0], instances[1], publisher:
        started = time.monotonic()
        for start in range(0, len(events), 200):
            await asyncio.gather(*(publisher.publish(e) for e in events[start : start + 200]))
        await wait_until(
            lambda: sum(map(len, handled.values())) >= 2000, timeout=60, what="2000 handled"
        )
        elapsed = time.monotonic() - started
    for k in range(50):
        assert handled[f"s{k:02d}"] == list(range(40)), f"key s{k:02d} out of order"
    # 2000 handlers of ~2.5 ms each would take ~5 s one at a time.
    assert gauge.peak > 1, "different keys must run concurrently"
    print(f"ordered: 2000 events over 50 keys in {elapsed:.2f} s, peak concurrency {gauge.peak}")


async def test_order_survives_losing_an_instance(bus_url: str, unique) -> None:
    service = unique("tracker")
    handled: dict[str, list[int]] = defaultdict(list)
    count = 0

    async def handle(event: ShipmentMoved) -> None:
        nonlocal count
        await asyncio.sleep(0.01)
        handled[event.shipment_id].append(event.seq)
        count += 1

    survivor = MessageBus(service, bus_url)
    victim = MessageBus(service, bus_url)
    for bus in (survivor, victim):
        await bus.subscribe(ShipmentMoved, handle, ordered=True, concurrency=8)
    publisher = MessageBus(unique("publisher"), bus_url)
    events = interleaved(20, 30)
    async with survivor, publisher:
        await victim.start()
        for start in range(0, len(events), 100):
            await asyncio.gather(*(publisher.publish(e) for e in events[start : start + 100]))
        await wait_until(lambda: count >= 150, timeout=30, what="a quarter handled")
        # The victim's connection goes away with messages in flight, as in a crash.
        await victim.transport.close()
        await wait_until(
            lambda: all(len(set(v)) == 30 for v in handled.values()) and len(handled) == 20,
            timeout=60,
            what="every event handled",
        )
        await asyncio.sleep(0.3)
        await victim.stop(grace_period=0)
    for k in range(20):
        seen = handled[f"s{k:02d}"]
        firsts = list(dict.fromkeys(seen))
        assert firsts == list(range(30)), f"key s{k:02d} lost or reordered: {seen}"
        # A redelivered event may run again, but never after a later one of its key.
        assert seen == sorted(seen), f"key s{k:02d} went backwards: {seen}"


async def test_failing_ordered_event_is_retried_in_place(bus_url: str, unique) -> None:
    handled: list[int] = []
    failures = 0

    async def handle(event: ShipmentMoved) -> None:
        nonlocal failures
        if event.seq == 1 and failures < 2:
            failures += 1
            raise RuntimeError("scanner offline")
        handled.append(event.seq)

    bus = MessageBus(unique("tracker"), bus_url)
    await bus.subscribe(
        ShipmentMoved,
        handle,
        ordered=True,
        retry=RetryPolicy(immediate=0, delayed=3, base=0.2, jitter=0),
    )
    async with bus:
        for seq in range(5):
            await bus.publish(ShipmentMoved(shipment_id="one", seq=seq))
        await wait_until(lambda: len(handled) == 5, timeout=10)
    assert handled == [0, 1, 2, 3, 4]
    assert failures == 2


async def test_idempotent_handler_runs_once_per_event_id(bus_url: str, unique) -> None:
    effects: list[str] = []
    calls: list[str] = []

    async def send_receipt(event: ReceiptPrinted, ctx: MessageContext) -> None:
        calls.append(ctx.id)
        if len(calls) == 2:  # the first real attempt of the second event fails once
            raise RuntimeError("printer jammed")
        effects.append(event.receipt_id)

    bus = MessageBus(unique("printer"), bus_url, retry=RetryPolicy(immediate=1, delayed=0))
    await bus.subscribe(ReceiptPrinted, send_receipt, idempotent=True)
    async with bus:
        for _ in range(5):
            await bus.publish(ReceiptPrinted(receipt_id="r1"), message_id="evt_same")
        await bus.publish(ReceiptPrinted(receipt_id="r2"), message_id="evt_other")
        await wait_until(lambda: len(effects) == 2, timeout=10)
        await asyncio.sleep(0.3)
        await bus.wait_idle(5)
    assert sorted(effects) == ["r1", "r2"]


async def test_custom_idempotency_key(bus_url: str, unique) -> None:
    effects: list[str] = []

    async def handle(event: ReceiptPrinted) -> None:
        effects.append(event.receipt_id)

    bus = MessageBus(unique("printer"), bus_url)
    await bus.subscribe(ReceiptPrinted, handle, idempotency_key=lambda e: e.receipt_id)
    async with bus:
        for _ in range(3):
            await bus.publish(ReceiptPrinted(receipt_id="same-receipt"))
        await bus.publish(ReceiptPrinted(receipt_id="another"))
        await wait_until(lambda: len(effects) >= 2, timeout=10)
        await asyncio.sleep(0.3)
    assert sorted(effects) == ["another", "same-receipt"]
