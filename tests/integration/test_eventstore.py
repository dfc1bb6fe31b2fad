"""Event store and transactional outbox, on real SQLite files and real PostgreSQL.

Every test runs once per backend. PostgreSQL gets a fresh schema per test
(``banyan_test_<hex>``, dropped afterwards) in ``BANYAN_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); if PostgreSQL does not answer the tests
FAIL with how to start it -- a skipped database test proves nothing.

A "killed" relay is one whose ``_mark_sent`` raises :class:`RelayKilled` (a
``BaseException``, like the ``CancelledError``/``SystemExit`` a dying process sees):
its transaction is rolled back exactly as when PostgreSQL loses the connection of a
dead process, after the broker has confirmed the publishes.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from banyan_bus import Event, MessageBus, MessageContext
from banyan_bus.eventstore import (
    ANY,
    NO_STREAM,
    ConcurrencyError,
    EventStore,
    OutboxBatch,
    OutboxMessage,
    PostgresEventStore,
    SqliteEventStore,
)
from banyan_bus.outbox import OutboxRelay
from tests.support import wait_until

POSTGRES_URL = os.environ.get(
    "BANYAN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
_PG_HINT = (
    "Start it with `bash scripts/services.sh postgres`, or point BANYAN_TEST_POSTGRES_URL "
    "at a server where this user may create schemas."
)


class TickRecorded(Event):
    stream: str
    seq: int


class OrderNoted(Event, partition_key="order_id"):
    order_id: str


StoreFactory = Callable[[], Awaitable[EventStore]]


class RelayKilled(BaseException):
    """The relay's process died here (not an Exception: nothing may catch and carry on)."""


class KilledRelay(OutboxRelay):
    """Dies after its ``kill_on``-th batch is published and confirmed, before marking it."""

    def __init__(self, store: EventStore, bus: MessageBus, *, kill_on: int = 1, **kw: Any) -> None:
        super().__init__(store, bus, **kw)
        self.kill_on = kill_on
        self.batches = 0
        self.unmarked: list[str] = []  # message ids published, never marked sent
        self.claimed = asyncio.Event()  # set once it holds a non-empty batch

    async def _publish_in_order(
        self, rows: Sequence[OutboxMessage]
    ) -> tuple[list[int], Exception | None]:
        self.claimed.set()
        return await super()._publish_in_order(rows)

    async def _mark_sent(self, batch: OutboxBatch, positions: Sequence[int]) -> None:
        self.batches += 1
        if self.batches == self.kill_on:
            done = set(positions)
            self.unmarked = [r.message_id for r in batch.rows if r.position in done]
            raise RelayKilled
        await super()._mark_sent(batch, positions)


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """``await open_store()``: a new store object (its own connection/pool) on this test's
    database -- call it twice for two processes, or again for a restart."""
    opened: list[EventStore] = []
    schema = f"banyan_test_{uuid.uuid4().hex[:12]}"

    async def make() -> EventStore:
        store: EventStore
        if request.param == "sqlite":
            store = SqliteEventStore(tmp_path / "events.db")
        else:
            store = PostgresEventStore(POSTGRES_URL, schema=schema, max_size=4)
        await store.open()
        opened.append(store)
        return store

    if request.param == "postgres":
        try:
            conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}. {_PG_HINT}")
        await conn.close()
    try:
        yield make
    finally:
        for store in opened:
            await store.close()
        if request.param == "postgres":
            conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


def ticks(stream: str, first: int, n: int) -> list[TickRecorded]:
    return [TickRecorded(stream=stream, seq=i) for i in range(first, first + n)]


async def test_optimistic_concurrency_clash_raises(open_store: StoreFactory) -> None:
    store = await open_store()
    assert await store.append_to_stream("s", ticks("s", 1, 2), expected_version=NO_STREAM) == 2
    with pytest.raises(ConcurrencyError) as info:
        await store.append_to_stream("s", ticks("s", 3, 1), expected_version=NO_STREAM)
    assert (info.value.stream, info.value.actual) == ("s", 2)
    with pytest.raises(ConcurrencyError):
        await store.append_to_stream("s", ticks("s", 3, 1), expected_version=1)
    assert await store.append_to_stream("s", ticks("s", 3, 1), expected_version=2) == 3
    assert await store.append_to_stream("s", ticks("s", 4, 1), expected_version=ANY) == 4

    # Writers racing from the same version, through two connections: exactly one wins.
    other = await open_store()
    results = await asyncio.gather(
        *(
            s.append_to_stream("s", ticks("s", 5, 1), expected_version=4)
            for s in (store, other, store, other)
        ),
        return_exceptions=True,
    )
    assert sum(r == 5 for r in results) == 1, results
    assert all(isinstance(r, ConcurrencyError) for r in results if r != 5), results
    assert [e.version for e in await store.read_stream("s")] == [1, 2, 3, 4, 5]
    assert await store.count_unsent() == 5  # refused appends left no outbox rows


async def test_read_stream_round_trip_with_metadata(open_store: StoreFactory) -> None:
    store = await open_store()
    assert await store.read_stream("nothing-here") == []
    await store.append_to_stream(
        "order-7",
        [OrderNoted(order_id="7"), TickRecorded(stream="order-7", seq=2)],
        expected_version=NO_STREAM,
        correlation_id="cor_abc",
        causation_id="cmd_xyz",
    )
    events = await store.read_stream("order-7")
    assert [(e.stream, e.version, e.message_type, e.message_version) for e in events] == [
        ("order-7", 1, "OrderNoted", 1),
        ("order-7", 2, "TickRecorded", 1),
    ]
    assert events[0].payload == {"orderId": "7"}  # the wire form, camelCase
    assert events[0].event == OrderNoted(order_id="7")
    assert events[1].event == TickRecorded(stream="order-7", seq=2)
    assert {(e.metadata.correlation_id, e.metadata.causation_id) for e in events} == {
        ("cor_abc", "cmd_xyz")
    }
    assert all(e.message_id.startswith("evt_") for e in events)
    assert len({e.message_id for e in events}) == 2
    assert all(e.recorded_at.tzinfo is not None for e in events)
    assert abs(events[0].recorded_at.timestamp() - time.time()) < 60
    assert [e.version for e in await store.read_stream("order-7", from_version=2)] == [2]


async def test_rolled_back_unit_of_work_publishes_nothing(
    open_store: StoreFactory, memory_url: str
) -> None:
    store = await open_store()
    received: list[str] = []

    async def handle(event: Event, ctx: MessageContext) -> None:
        received.append(ctx.id)

    bus = MessageBus("rollback-test", memory_url)
    await bus.subscribe(TickRecorded, handle)
    await bus.subscribe(OrderNoted, handle)
    async with bus:

        async def failing_work() -> None:
            async with store.unit_of_work() as uow:
                await uow.append("s", ticks("s", 1, 3), expected_version=NO_STREAM)
                await uow.publish(OrderNoted(order_id="1"))
                raise RuntimeError("payment declined")

        with pytest.raises(RuntimeError, match="payment declined"):
            await failing_work()
        assert await store.read_stream("s") == []
        assert await store.count_unsent() == 0
        assert await OutboxRelay(store, bus).relay_once() == 0

        # The same work, committed, is published: events and the publish-only row.
        async with store.unit_of_work() as uow:
            await uow.append("s", ticks("s", 1, 3), expected_version=NO_STREAM)
            noted = await uow.publish(OrderNoted(order_id="1"))
        assert await OutboxRelay(store, bus).relay_once() == 4
        await wait_until(lambda: len(received) == 4, timeout=10, what="4 deliveries")
        stored_ids = [e.message_id for e in await store.read_stream("s")]
        assert sorted(received) == sorted([*stored_ids, noted])  # ids kept end to end
        assert await store.count_unsent() == 0
        await store.append_to_stream("s", ticks("s", 4, 1), expected_version=3)  # unsent
        assert await store.purge_sent(older_than=timedelta(days=1)) == 0  # too recent
        assert await store.purge_sent(older_than=timedelta(0)) == 4  # sent rows only
        assert await store.count_unsent() == 1
        assert len(await store.read_stream("s")) == 4  # events are never purged


async def test_killed_relay_resends_and_idempotent_consumer_acts_once(
    open_store: StoreFactory, amqp_url: str
) -> None:
    store = await open_store()
    await store.append_to_stream("order-1", ticks("order-1", 1, 5), expected_version=NO_STREAM)
    side_effects: list[int] = []
    deliveries: list[str] = []

    async def charge(event: TickRecorded) -> None:
        side_effects.append(event.seq)

    async def audit(event: TickRecorded, ctx: MessageContext) -> None:
        deliveries.append(ctx.id)

    consumer = MessageBus("billing", amqp_url)
    await consumer.subscribe(TickRecorded, charge, idempotent=True)
    await consumer.subscribe(TickRecorded, audit, subscription_group="audit")
    async with consumer, MessageBus("relay", amqp_url) as publisher:
        killed = KilledRelay(store, publisher)
        with pytest.raises(RelayKilled):
            await killed.relay_once()
        assert len(killed.unmarked) == 5  # published and confirmed, then the process died
        await wait_until(lambda: len(deliveries) == 5, timeout=15, what="first sends")

        restarted_store = await open_store()  # a new process: new connection, same database
        assert await restarted_store.count_unsent() == 5
        assert await OutboxRelay(restarted_store, publisher).relay_once() == 5
        assert await restarted_store.count_unsent() == 0
        await wait_until(lambda: len(deliveries) == 10, timeout=15, what="re-sends")
        await asyncio.sleep(0.3)  # let any (wrong) second side effect happen
    assert Counter(deliveries) == {i: 2 for i in set(deliveries)}  # same ids re-sent
    assert sorted(side_effects) == [1, 2, 3, 4, 5]  # one side effect per event


async def test_two_relays_publish_every_row_in_stream_order(
    open_store: StoreFactory, amqp_url: str
) -> None:
    streams, per_stream = 50, 20
    writer = await open_store()
    for seq in range(1, per_stream + 1):  # interleave streams in the outbox
        async with writer.unit_of_work() as uow:
            for s in range(streams):
                await uow.append(f"s{s:02d}", ticks(f"s{s:02d}", seq, 1), expected_version=seq - 1)
    assert await writer.count_unsent() == streams * per_stream
    all_ids = {e.message_id for s in range(streams) for e in await writer.read_stream(f"s{s:02d}")}
    received: list[tuple[str, int, str]] = []

    async def handle(event: TickRecorded, ctx: MessageContext) -> None:
        received.append((event.stream, event.seq, ctx.id))

    consumer = MessageBus("ledger", amqp_url)
    await consumer.subscribe(TickRecorded, handle, ordered=True, concurrency=16)
    async with (
        consumer,
        MessageBus("relay-a", amqp_url) as bus_a,
        MessageBus("relay-b", amqp_url) as bus_b,
    ):
        store_a, store_b = await open_store(), await open_store()
        doomed = KilledRelay(store_a, bus_a, kill_on=2, batch_size=10, poll_interval=0.02)
        survivor = OutboxRelay(store_b, bus_b, batch_size=10, poll_interval=0.02)
        assert await doomed.relay_once() == 10  # its first batch goes through
        doomed.claimed.clear()
        dying = asyncio.create_task(doomed.relay_once())  # its second is published, then it dies
        await asyncio.wait_for(doomed.claimed.wait(), timeout=10)
        task_b = asyncio.create_task(survivor.run())  # the other relay works meanwhile
        with pytest.raises(RelayKilled):
            await asyncio.wait_for(dying, timeout=20)
        await store_a.close()  # the dead process's connection goes away
        restarted = OutboxRelay(await open_store(), bus_a, batch_size=10, poll_interval=0.02)
        task_a = asyncio.create_task(restarted.run())
        await wait_until(
            lambda: {i for _, _, i in received} == all_ids, timeout=40, what="all 1,000 ids"
        )
        restarted.stop()
        survivor.stop()
        await asyncio.gather(task_a, task_b)
        assert await writer.count_unsent() == 0
        await asyncio.sleep(0.3)

    counts = Counter(i for _, _, i in received)
    duplicated = {i for i, n in counts.items() if n > 1}
    unmarked_ids = set(doomed.unmarked)
    assert doomed.unmarked, "the doomed relay published a batch before dying"
    assert duplicated <= unmarked_ids, "a row was published twice without a relay dying"
    assert max(counts.values()) <= 2
    if isinstance(writer, PostgresEventStore):  # SQLite relays take turns, not always fairly
        assert survivor.published > 0, "both relays took part"
    for s in range(streams):
        seqs = [seq for stream, seq, _ in received if stream == f"s{s:02d}"]
        firsts = list(dict.fromkeys(seqs))
        assert firsts == list(range(1, per_stream + 1)), f"s{s:02d} out of order: {seqs}"
    print(
        f"two relays: {len(all_ids)} rows, {len(received)} deliveries, "
        f"{len(duplicated)} re-sent after the kill; relays published "
        f"{doomed.published}+{restarted.published} (killed+restarted), {survivor.published}"
    )


async def test_order_aggregate_rules_and_stale_save(open_store: StoreFactory) -> None:
    from examples.orders.order_aggregate import Order, OrderRuleViolated

    store = await open_store()
    async with store.unit_of_work() as uow:
        order = await Order.load(uow, "ord_1")
        order.place(customer_id="c_1", total=Decimal("9.90"))
        with pytest.raises(OrderRuleViolated):
            order.ship(carrier="dhl", tracking_number="t1")
        assert await order.save(uow) == 1
    async with store.unit_of_work() as uow:
        order = await Order.load(uow, "ord_1")
        order.mark_paid(payment_id="pay_1", amount=Decimal("9.90"))
        order.ship(carrier="dhl", tracking_number="t1")
        assert await order.save(uow) == 3
    stale = Order.from_events("ord_1", (await store.read_stream("order-ord_1"))[:1])
    assert (stale.status, stale.version) == ("placed", 1)
    stale.mark_paid(payment_id="pay_2", amount=Decimal("9.90"))
    with pytest.raises(ConcurrencyError):
        async with store.unit_of_work() as uow:
            await stale.save(uow)
    current = Order.from_events("ord_1", await store.read_stream("order-ord_1"))
    assert (current.status, current.version, current.tracking_number) == ("shipped", 3, "t1")
    assert current.uncommitted_events == []


async def test_place_order_command_goes_through_the_outbox(
    open_store: StoreFactory, memory_url: str
) -> None:
    from contracts.orders import OrderPlaced, PlaceOrder
    from examples.orders.order_store_service import OrderStoreService

    store = await open_store()
    placed: list[tuple[str, str]] = []

    async def on_placed(event: OrderPlaced, ctx: MessageContext) -> None:
        placed.append((event.order_id, ctx.id))

    listener = MessageBus("shipping-test", memory_url)
    await listener.subscribe(OrderPlaced, on_placed)
    async with listener, OrderStoreService(memory_url, store) as service:
        command = PlaceOrder(order_id="ord_9", customer_id="c_9", total=Decimal("5"))
        assert await listener.send(command, timeout=10) == "ord_9"
        assert await listener.send(command, timeout=10) == "ord_9"  # a client retry
        await wait_until(lambda: len(placed) == 1, timeout=10, what="OrderPlaced")
        await asyncio.sleep(0.3)
        stored = await service.store.read_stream("order-ord_9")
    assert [e.message_type for e in stored] == ["OrderPlaced"]
    assert placed == [("ord_9", stored[0].message_id)]
    assert stored[0].metadata.causation_id is not None  # the PlaceOrder command caused it


async def test_callers_errors_pass_through_and_the_store_stays_usable(
    open_store: StoreFactory,
) -> None:
    store = await open_store()

    async def work_that_fails(error: Exception) -> None:
        async with store.unit_of_work() as uow:
            await uow.append("s", ticks("s", 1, 1))
            raise error

    for error in (OSError("disk full on the caller's side"), KeyError("k")):
        with pytest.raises(type(error)):
            await work_that_fails(error)
    assert await store.append_to_stream("s", ticks("s", 1, 1), expected_version=0) == 1


async def test_unreachable_postgres_is_an_event_store_error() -> None:
    from banyan_bus.eventstore import EventStoreError

    store = PostgresEventStore("postgresql://postgres@127.0.0.1:1/none", schema="x")
    with pytest.raises(EventStoreError, match="cannot connect"):
        await store.open()
