"""The core contract: groups, competing consumers, back-pressure, ordering of handlers,
priorities, envelope round trip, size limit, restart. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from banyan_bus import Event, MessageBus, MessageContext, PayloadTooLarge, RetryPolicy
from tests.support import Gauge, duplicates, wait_until


class ParcelScanned(Event):
    parcel_id: str
    seq: int = 0
    note: str = ""


class ParcelScannedV2(Event, name="ParcelScanned", version=2):
    parcel_id: str
    seq: int = 0
    depot: str = "main"


class ParcelLost(Event):
    parcel_id: str


NO_RETRY = RetryPolicy.none()


async def test_every_group_receives_each_event(bus_url: str, unique) -> None:
    a_seen: list[str] = []
    b_seen: list[str] = []

    async def on_a(event: ParcelScanned) -> None:
        a_seen.append(event.parcel_id)

    async def on_b(event: ParcelScanned) -> None:
        b_seen.append(event.parcel_id)

    a = MessageBus(unique("svc-a"), bus_url)
    b = MessageBus(unique("svc-b"), bus_url)
    publisher = MessageBus(unique("publisher"), bus_url)
    await a.subscribe(ParcelScanned, on_a)
    await b.subscribe(ParcelScanned, on_b)
    async with a, b, publisher:
        ids = [f"p{i}" for i in range(50)]
        for pid in ids:
            await publisher.publish(ParcelScanned(parcel_id=pid))
        await wait_until(lambda: len(a_seen) >= 50 and len(b_seen) >= 50, what="both groups")
        await asyncio.sleep(0.2)  # any duplicate would arrive now
    assert sorted(a_seen) == sorted(ids)
    assert sorted(b_seen) == sorted(ids)


async def test_instances_of_one_group_share_the_work(bus_url: str, unique) -> None:
    group = unique("workers")
    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}

    def handler_for(i: int):
        async def handle(event: ParcelScanned) -> None:
            await asyncio.sleep(0.002)
            seen[i].append(event.parcel_id)

        return handle

    instances = [MessageBus(group, bus_url) for _ in range(3)]
    for i, bus in enumerate(instances):
        await bus.subscribe(ParcelScanned, handler_for(i), concurrency=2, prefetch=2)
    publisher = MessageBus(unique("publisher"), bus_url)
    async with instances[0], instances[1], instances[2], publisher:
        ids = [f"p{i}" for i in range(300)]
        await asyncio.gather(*(publisher.publish(ParcelScanned(parcel_id=p)) for p in ids))
        total = lambda: sum(len(v) for v in seen.values())  # noqa: E731
        await wait_until(lambda: total() >= 300, timeout=30, what="300 handled")
        await asyncio.sleep(0.3)
    everything = [pid for handled in seen.values() for pid in handled]
    assert duplicates(everything) == {}
    assert sorted(everything) == sorted(ids)
    assert all(len(handled) > 0 for handled in seen.values()), {k: len(v) for k, v in seen.items()}


async def test_prefetch_bounds_unacked_deliveries(bus_url: str, unique) -> None:
    gauge = Gauge()
    release = asyncio.Event()

    async def handle(event: ParcelScanned) -> None:
        with gauge:
            await release.wait()

    consumer = MessageBus(unique("svc"), bus_url)
    # concurrency allows 10, but only 3 deliveries may be unacked: 3 run at once.
    await consumer.subscribe(ParcelScanned, handle, concurrency=10, prefetch=3)
    publisher = MessageBus(unique("publisher"), bus_url)
    async with consumer, publisher:
        for i in range(20):
            await publisher.publish(ParcelScanned(parcel_id=f"p{i}"))
        await wait_until(lambda: gauge.now == 3, what="3 handlers running")
        await asyncio.sleep(0.3)
        assert gauge.peak == 3
        release.set()
        await wait_until(lambda: gauge.now == 0, timeout=10)
    assert gauge.peak == 3


async def test_concurrency_runs_exactly_that_many_handlers(bus_url: str, unique) -> None:
    gauge = Gauge()
    done: list[str] = []

    async def handle(event: ParcelScanned) -> None:
        with gauge:
            await asyncio.sleep(0.05)
        done.append(event.parcel_id)

    consumer = MessageBus(unique("svc"), bus_url)
    await consumer.subscribe(ParcelScanned, handle, concurrency=5, prefetch=20)
    publisher = MessageBus(unique("publisher"), bus_url)
    async with consumer, publisher:
        await asyncio.gather(
            *(publisher.publish(ParcelScanned(parcel_id=f"p{i}")) for i in range(30))
        )
        await wait_until(lambda: len(done) == 30, timeout=15)
    assert gauge.peak == 5


async def test_handlers_of_one_group_run_in_definition_order(bus_url: str, unique) -> None:
    calls: list[tuple[str, str]] = []

    async def first(event: ParcelScanned) -> None:
        await asyncio.sleep(0.01)
        calls.append(("first", event.parcel_id))

    async def second(event: ParcelScanned, ctx: MessageContext) -> None:
        calls.append(("second", event.parcel_id))

    async def third(event: ParcelScanned) -> None:
        calls.append(("third", event.parcel_id))

    bus = MessageBus(unique("svc"), bus_url)
    await bus.subscribe(ParcelScanned, first)
    await bus.subscribe(ParcelScanned, second)
    await bus.subscribe(ParcelScanned, third)
    async with bus:
        for i in range(5):
            await bus.publish(ParcelScanned(parcel_id=f"p{i}"))
        await wait_until(lambda: len(calls) == 15)
    for i in range(5):
        order = [name for name, pid in calls if pid == f"p{i}"]
        assert order == ["first", "second", "third"]


async def test_high_priority_is_handled_before_a_normal_backlog(bus_url: str, unique) -> None:
    service = unique("svc")
    handled: list[str] = []

    async def handle(event: ParcelScanned) -> None:
        handled.append(event.note)

    # Declare the classic (priority) queue, then stop consuming to build a backlog.
    declaring = MessageBus(service, bus_url, queue_type="classic")
    await declaring.subscribe(ParcelScanned, handle)
    async with declaring:
        pass
    publisher = MessageBus(unique("publisher"), bus_url)
    async with publisher:
        for i in range(10):
            await publisher.publish(ParcelScanned(parcel_id=f"n{i}", note="normal"))
        for i in range(10):
            await publisher.publish(ParcelScanned(parcel_id=f"h{i}", note="high"), priority="high")
        for i in range(5):
            await publisher.publish(ParcelScanned(parcel_id=f"l{i}", note="low"), priority="low")
    consumer = MessageBus(service, bus_url, queue_type="classic")
    await consumer.subscribe(ParcelScanned, handle, concurrency=1, prefetch=1)
    async with consumer:
        await wait_until(lambda: len(handled) == 25)
    assert handled == ["high"] * 10 + ["normal"] * 10 + ["low"] * 5


async def test_envelope_round_trips_metadata(bus_url: str, unique) -> None:
    got: list[tuple[ParcelScanned, MessageContext]] = []

    async def handle(event: ParcelScanned, ctx: MessageContext) -> None:
        got.append((event, ctx))

    publisher_name = unique("publisher")
    bus = MessageBus(unique("svc"), bus_url)
    await bus.subscribe(ParcelScanned, handle)
    publisher = MessageBus(publisher_name, bus_url)
    async with bus, publisher:
        before = datetime.now(UTC)
        message_id = await publisher.publish(
            ParcelScanned(parcel_id="p1", seq=7, note="ünïcødé ✓"), correlation_id="cor_fixed"
        )
        await wait_until(lambda: len(got) == 1)
    event, ctx = got[0]
    assert event == ParcelScanned(parcel_id="p1", seq=7, note="ünïcødé ✓")
    assert ctx.id == message_id
    assert message_id.startswith("evt_")
    assert ctx.correlation_id == "cor_fixed"
    assert ctx.causation_id is None
    assert ctx.message_type == "ParcelScanned"
    assert ctx.version == 1
    assert ctx.service_name == publisher_name
    assert ctx.attempt == 1
    assert ctx.delay == 0
    assert before - timedelta(seconds=1) <= ctx.timestamp <= datetime.now(UTC)


async def test_publish_inside_a_handler_inherits_correlation(bus_url: str, unique) -> None:
    lost: list[MessageContext] = []
    scanned_ids: list[str] = []
    bus = MessageBus(unique("svc"), bus_url)

    async def on_scanned(event: ParcelScanned, ctx: MessageContext) -> None:
        scanned_ids.append(ctx.id)
        await bus.publish(ParcelLost(parcel_id=event.parcel_id))

    async def on_lost(event: ParcelLost, ctx: MessageContext) -> None:
        lost.append(ctx)

    await bus.subscribe(ParcelScanned, on_scanned)
    await bus.subscribe(ParcelLost, on_lost)
    async with bus:
        await bus.publish(ParcelScanned(parcel_id="p1"), correlation_id="cor_chain")
        await wait_until(lambda: len(lost) == 1)
    assert lost[0].correlation_id == "cor_chain"
    assert lost[0].causation_id == scanned_ids[0]


async def test_versions_travel_side_by_side(bus_url: str, unique) -> None:
    v1: list[ParcelScanned] = []
    v2: list[ParcelScannedV2] = []

    async def on_v1(event: ParcelScanned) -> None:
        v1.append(event)

    async def on_v2(event: ParcelScannedV2) -> None:
        v2.append(event)

    bus = MessageBus(unique("svc"), bus_url)
    await bus.subscribe(ParcelScanned, on_v1)
    await bus.subscribe(ParcelScannedV2, on_v2)
    async with bus:
        await bus.publish(ParcelScanned(parcel_id="old"))
        await bus.publish(ParcelScannedV2(parcel_id="new", depot="north"))
        await wait_until(lambda: len(v1) == 1 and len(v2) == 1)
    assert v1[0].parcel_id == "old"
    assert v2[0] == ParcelScannedV2(parcel_id="new", depot="north")


async def test_oversized_payload_is_refused_before_sending(bus_url: str, unique) -> None:
    handled: list[str] = []

    async def handle(event: ParcelScanned) -> None:
        handled.append(event.parcel_id)

    bus = MessageBus(unique("svc"), bus_url)
    sub = await bus.subscribe(ParcelScanned, handle)
    async with bus:
        with pytest.raises(PayloadTooLarge, match="over the limit of 262144 bytes"):
            await bus.publish(ParcelScanned(parcel_id="big", note="x" * 300 * 1024))
        await bus.publish(ParcelScanned(parcel_id="small"))
        await wait_until(lambda: handled == ["small"])
        state = await bus.transport.queue_state(sub.queue_name)
        assert state is not None
        assert state.messages == 0


async def test_invalid_data_raises_validation_error_and_sends_nothing(bus_url: str, unique) -> None:
    handled: list[str] = []

    async def handle(event: ParcelScanned) -> None:
        handled.append(event.parcel_id)

    bus = MessageBus(unique("svc"), bus_url)
    await bus.subscribe(ParcelScanned, handle)
    async with bus:
        with pytest.raises(ValidationError):
            await bus.publish(ParcelScanned, {"parcelId": 12, "seq": "not a number"})
        await bus.publish(ParcelScanned, {"parcelId": "from-dict", "seq": 3})
        await wait_until(lambda: len(handled) == 1)
        await asyncio.sleep(0.1)
    assert handled == ["from-dict"]


async def test_publish_with_no_subscriber_is_not_an_error(bus_url: str, unique) -> None:
    async with MessageBus(unique("lonely"), bus_url) as bus:
        message_id = await bus.publish(ParcelLost(parcel_id="nobody-listens"))
    assert message_id.startswith("evt_")


async def test_restarted_consumer_redeclares_and_resumes(bus_url: str, unique) -> None:
    service = unique("svc")
    handled: list[str] = []

    async def handle(event: ParcelScanned) -> None:
        handled.append(event.parcel_id)

    first = MessageBus(service, bus_url)
    await first.subscribe(ParcelScanned, handle)
    async with first:
        await first.publish(ParcelScanned(parcel_id="before"))
        await wait_until(lambda: handled == ["before"])
    publisher = MessageBus(unique("publisher"), bus_url)
    async with publisher:  # published while the service is down: kept in its queue
        await publisher.publish(ParcelScanned(parcel_id="while-down"))
    second = MessageBus(service, bus_url)
    await second.subscribe(ParcelScanned, handle)
    async with second:
        await second.publish(ParcelScanned(parcel_id="after"))
        await wait_until(lambda: len(handled) == 3)
    assert handled[0] == "before"
    assert sorted(handled[1:]) == ["after", "while-down"]


async def test_manual_ack_and_reject(bus_url: str, unique) -> None:
    acked: list[str] = []

    async def handle(event: ParcelScanned, ctx: MessageContext) -> None:
        if event.parcel_id == "bad":
            await ctx.reject()
        else:
            await ctx.ack()
            acked.append(event.parcel_id)

    bus = MessageBus(unique("svc"), bus_url)
    sub = await bus.subscribe(ParcelScanned, handle, auto_ack=False, retry=NO_RETRY)
    async with bus:
        await bus.publish(ParcelScanned(parcel_id="good"))
        await bus.publish(ParcelScanned(parcel_id="bad"))
        await wait_until(lambda: acked == ["good"])

        async def dlq_has_one() -> bool:
            state = await bus.transport.queue_state(sub.dlq_name)
            return state is not None and state.messages == 1

        for _ in range(200):
            if await dlq_has_one():
                break
            await asyncio.sleep(0.02)
        assert await dlq_has_one()
        queue = await bus.transport.queue_state(sub.queue_name)
        assert queue is not None
        assert queue.messages == 0


async def test_ctx_ack_refused_in_auto_ack_mode(bus_url: str, unique) -> None:
    errors: list[BaseException] = []

    async def handle(event: ParcelScanned, ctx: MessageContext) -> None:
        try:
            await ctx.ack()
        except RuntimeError as exc:
            errors.append(exc)

    bus = MessageBus(unique("svc"), bus_url)
    await bus.subscribe(ParcelScanned, handle)
    async with bus:
        await bus.publish(ParcelScanned(parcel_id="p"))
        await wait_until(lambda: len(errors) == 1)
    assert "auto_ack=False" in str(errors[0])
