"""Per-aggregate order across event types (DESIGN.md §8, issue 17 §2): a group's ordered
subscriptions to several types share one ordered stream, so one key's events of all
types are handled one at a time in publish order. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict

import pytest

from banyan_bus import ConfigurationError, Event, MessageBus, RetryPolicy
from banyan_bus.topology import ExchangeDecl, QueueDecl
from banyan_bus.transport.base import Delivery
from tests.support import Gauge, wait_until


class ParcelBooked(Event, partition_key="parcel_id"):
    parcel_id: str
    round: int


class ParcelPaid(Event, partition_key="parcel_id"):
    parcel_id: str
    round: int


class ParcelShipped(Event, partition_key="parcel_id"):
    parcel_id: str
    round: int


STEPS: tuple[type[ParcelBooked | ParcelPaid | ParcelShipped], ...] = (
    ParcelBooked,
    ParcelPaid,
    ParcelShipped,
)


def expected(rounds: int) -> list[tuple[int, str]]:
    return [(r, step.__name__) for r in range(rounds) for step in STEPS]


async def publish_interleaved(publisher: MessageBus, keys: list[str], rounds: int) -> None:
    """booked -> paid -> shipped per key, ``rounds`` times, keys interleaved; each layer
    (one step of one round over every key) is confirmed before the next is published,
    so every key's publish order is exactly ``expected(rounds)``."""
    for r in range(rounds):
        for step in STEPS:
            await asyncio.gather(*(publisher.publish(step(parcel_id=k, round=r)) for k in keys))


async def test_one_key_of_three_types_keeps_publish_order_across_instances(
    bus_url: str, unique
) -> None:
    group = unique("parcels")
    keys = [f"p{k:02d}" for k in range(20)]
    rounds = 10
    handled: dict[str, list[tuple[int, str]]] = defaultdict(list)
    by_instance: Counter[int] = Counter()
    gauge = Gauge()
    rng = random.Random(17)
    # The first step is the slowest: with per-type order only, later steps overtake it.
    pause = {"ParcelBooked": 0.006, "ParcelPaid": 0.003, "ParcelShipped": 0.0}

    def handler(instance: int):
        async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
            with gauge:
                await asyncio.sleep(rng.uniform(0, pause[type(event).__name__]))
            handled[event.parcel_id].append((event.round, type(event).__name__))
            by_instance[instance] += 1

        return handle

    instances = [MessageBus(group, bus_url) for _ in range(3)]
    for index, bus in enumerate(instances):
        for step in STEPS:
            await bus.subscribe(step, handler(index), ordered=True, concurrency=8)
    publisher = MessageBus(unique("publisher"), bus_url)
    total = len(keys) * rounds * len(STEPS)
    async with instances[0], instances[1], instances[2], publisher:
        started = time.monotonic()
        await publish_interleaved(publisher, keys, rounds)
        await wait_until(
            lambda: sum(map(len, handled.values())) >= total, timeout=60, what=f"{total} handled"
        )
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now
    assert sum(map(len, handled.values())) == total
    for key in keys:
        assert handled[key] == expected(rounds), f"{key} out of publish order: {handled[key]}"
    assert gauge.peak > 1, "different keys must run concurrently"
    print(
        f"ordered across types: {total} events ({len(STEPS)} types, {len(keys)} keys, "
        f"{rounds} rounds) on {len(instances)} instances in {elapsed:.2f} s, "
        f"peak concurrency {gauge.peak}, per instance {dict(by_instance)}"
    )


async def test_order_across_types_survives_losing_the_active_instance(bus_url: str, unique) -> None:
    group = unique("parcels")
    keys = [f"p{k:02d}" for k in range(10)]
    rounds = 8
    handled: dict[str, list[tuple[int, str]]] = defaultdict(list)

    by_instance: Counter[str] = Counter()

    def handler(instance: str):
        async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
            await asyncio.sleep(0.005)
            handled[event.parcel_id].append((event.round, type(event).__name__))
            by_instance[instance] += 1

        return handle

    victim = MessageBus(group, bus_url)  # started first: the active consumer of every queue
    survivor = MessageBus(group, bus_url)
    for name, bus in (("victim", victim), ("survivor", survivor)):
        for step in STEPS:
            await bus.subscribe(step, handler(name), ordered=True, concurrency=8)
    publisher = MessageBus(unique("publisher"), bus_url)
    total = len(keys) * rounds * len(STEPS)
    async with victim, publisher:
        await survivor.start()
        await publish_interleaved(publisher, keys, rounds)
        await wait_until(
            lambda: sum(map(len, handled.values())) >= total // 4, timeout=30, what="a quarter"
        )
        await victim.transport.close()  # gone with messages in flight, as in a crash
        await wait_until(
            lambda: all(len(set(handled[k])) == rounds * len(STEPS) for k in keys),
            timeout=60,
            what="every event handled",
        )
        await asyncio.sleep(0.3)
        await survivor.stop()
    assert by_instance["victim"] > 0
    assert by_instance["survivor"] > 0
    order = expected(rounds)
    for key in keys:
        seen = handled[key]
        assert list(dict.fromkeys(seen)) == order, f"{key} lost or reordered: {seen}"
        # A redelivered event may run again, but never after a later one of its key.
        positions = [order.index(item) for item in seen]
        assert positions == sorted(positions), f"{key} went backwards: {seen}"


async def test_a_failing_event_is_retried_in_place_and_holds_its_key_of_every_type(
    bus_url: str, unique
) -> None:
    group = unique("parcels")
    log: list[tuple[str, int, str]] = []
    failures = 0

    async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
        nonlocal failures
        if event.parcel_id == "slow" and isinstance(event, ParcelPaid) and event.round == 0:
            if failures < 2:
                failures += 1
                raise RuntimeError("payment service unavailable")
        log.append((event.parcel_id, event.round, type(event).__name__))

    retry = RetryPolicy(immediate=0, delayed=3, base=0.2, jitter=0)
    bus = MessageBus(group, bus_url)
    for step in STEPS:
        await bus.subscribe(step, handle, ordered=True, retry=retry)
    async with bus:
        await publish_interleaved(bus, ["slow", "fast"], 3)
        await wait_until(lambda: len(log) == 18, timeout=15, what="18 handled")
    assert failures == 2
    for key in ("slow", "fast"):
        assert [(r, t) for k, r, t in log if k == key] == expected(3), key
    # The other key did not wait for the retries (two delays, 0.2 s and 0.4 s).
    assert log.index(("fast", 2, "ParcelShipped")) < log.index(("slow", 0, "ParcelPaid"))


async def test_an_exhausted_event_goes_to_its_types_dlq_and_its_key_goes_on(
    bus_url: str, unique
) -> None:
    group = unique("parcels")
    log: list[tuple[int, str]] = []
    declined = True

    async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
        if declined and isinstance(event, ParcelPaid) and event.round == 0:
            raise RuntimeError("card declined")
        log.append((event.round, type(event).__name__))

    retry = RetryPolicy(immediate=1, delayed=1, base=0.1, jitter=0)
    bus = MessageBus(group, bus_url)
    for step in STEPS:
        await bus.subscribe(step, handle, ordered=True, retry=retry)
    async with bus:
        await publish_interleaved(bus, ["k1"], 2)
        await wait_until(lambda: len(log) == 5, timeout=15, what="5 handled")
        dead = await bus.dlq(group, ParcelPaid).list()
        assert [d.reason for d in dead] == ["handler-failed"]
        assert await bus.dlq(group, ParcelBooked).list() == []
        assert await bus.dlq(group, ParcelShipped).list() == []
        # A replay goes back through the type's own exchange into the ordered stream.
        declined = False
        result = await bus.dlq(group, ParcelPaid).replay()
        assert result.ok
        assert len(result.replayed) == 1
        await wait_until(lambda: len(log) == 6, timeout=15, what="the replay handled")
        assert await bus.dlq(group, ParcelPaid).list() == []
    assert log == [(0, "ParcelBooked"), (0, "ParcelShipped"), *expected(2)[3:], (0, "ParcelPaid")]


async def test_what_the_broker_dead_letters_reaches_the_dlq_of_its_type(
    bus_url: str, unique
) -> None:
    group = unique("parcels")

    async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
        pass

    subscriber = MessageBus(group, bus_url)
    for step in STEPS:
        await subscriber.subscribe(step, handle, ordered=True, partitions=2)
    async with subscriber:  # declares the stream
        pass
    rejected: list[str] = []

    async def reject(delivery: Delivery) -> None:
        rejected.append(delivery.message_type or "")
        await delivery.reject()  # no engine record: the queue's own dead-lettering

    raw = MessageBus(unique("operator"), bus_url)
    async with raw:
        for queue in subscriber.subscriptions[0].queue_names:
            await raw.transport.consume(queue, reject, prefetch=10)
        await raw.publish(ParcelPaid(parcel_id="k1", round=0))
        await raw.publish(ParcelShipped(parcel_id="k1", round=0))
        await raw.publish(ParcelPaid(parcel_id="k2", round=0), after=5)  # through the delay levels
        await wait_until(lambda: len(rejected) == 3, timeout=15, what="3 rejected")

        async def dead(step: type[Event]) -> list[str]:
            return [d.reason for d in await raw.dlq(group, step).list()]

        deadline = time.monotonic() + 10
        while len(await dead(ParcelPaid)) + len(await dead(ParcelShipped)) < 3:
            assert time.monotonic() < deadline, "the broker's dead letters did not arrive"
            await asyncio.sleep(0.05)
        assert await dead(ParcelPaid) == ["rejected", "rejected"]
        assert await dead(ParcelShipped) == ["rejected"]
        assert await dead(ParcelBooked) == []


def test_ordered_subscriptions_of_a_group_must_agree_on_partitions() -> None:
    bus = MessageBus("parcels-agree")

    async def handle(event: ParcelBooked | ParcelPaid) -> None:
        pass

    asyncio.run(bus.subscribe(ParcelBooked, handle, ordered=True, partitions=8))
    with pytest.raises(ConfigurationError, match=r"share one ordered stream.*partitions=8"):
        asyncio.run(bus.subscribe(ParcelPaid, handle, ordered=True))
    # Another group, or an unordered subscription, is not part of the stream.
    asyncio.run(bus.subscribe(ParcelPaid, handle, ordered=True, subscription_group="other"))
    asyncio.run(bus.subscribe(ParcelShipped, handle))


def test_one_stream_per_group_in_the_topology() -> None:
    bus = MessageBus("parcels-plan")

    async def handle(event: ParcelBooked | ParcelPaid | ParcelShipped) -> None:
        pass

    for step in STEPS:
        asyncio.run(bus.subscribe(step, handle, ordered=True, partitions=3))
    plan = bus.topology()
    root = "exchange.platform.events.parcels-plan"
    queues = [d.name for d in plan if isinstance(d, QueueDecl) and d.name.startswith(root)]
    assert queues == [f"{root}.ordered-stream.p{i}" for i in range(3)]
    exchanges = {d.name: d.type for d in plan if isinstance(d, ExchangeDecl)}
    assert exchanges[f"{root}.ordered-stream"] == "x-consistent-hash"
    assert exchanges[f"{root}.parcelpaid"] == "x-consistent-hash"
    dlqs = [d.name for d in plan if isinstance(d, QueueDecl) and d.name.startswith("dlq.")]
    assert dlqs == [
        f"dlq.{root}.parcelbooked",
        f"dlq.{root}.parcelpaid",
        f"dlq.{root}.parcelshipped",
    ]
    assert {sub.queue_names[0] for sub in bus.subscriptions} == {f"{root}.ordered-stream.p0"}
