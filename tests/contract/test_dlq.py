"""Operating a dead-letter queue: list (peek), replay (all, by id, filtered), purge, and
failed replays that must leave the messages where they were. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy, TopologyError
from banyan_bus.bus import make_transport
from banyan_bus.dlq import DeadLetter, DeadLetterQueue
from tests.support import duplicates, wait_until

NO_RETRY = RetryPolicy.none()


class InvoiceIssued(Event):
    invoice_id: str
    seq: int = 0


class InvoiceVoided(Event):
    invoice_id: str


async def wait_count(dlq: DeadLetterQueue, expected: int, timeout: float = 10.0) -> None:
    """Poll the DLQ's ready count until it is ``expected``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (seen := await dlq.count()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{dlq.name}: {seen} messages after {timeout} s, not {expected}")
        await asyncio.sleep(0.02)


def without_delivery_count(dead: DeadLetter) -> DeadLetter:
    """The record without the broker's count of deliveries (each peek adds one)."""
    headers = {k: v for k, v in dead.headers.items() if k != "x-delivery-count"}
    return dataclasses.replace(dead, headers=headers)


class Flaky:
    """A handler that fails while ``broken`` and records what it handled (with context)."""

    def __init__(self) -> None:
        self.broken = True
        self.handled: list[str] = []
        self.contexts: list[MessageContext] = []

    def handler(self) -> Callable[[InvoiceIssued, MessageContext], Awaitable[None]]:
        # A function, not this object: the bus names a handler by its qualified name.
        async def post_to_ledger(event: InvoiceIssued, ctx: MessageContext) -> None:
            if self.broken:
                raise RuntimeError(f"ledger unavailable for {event.invoice_id}")
            self.handled.append(ctx.id)
            self.contexts.append(ctx)

        return post_to_ledger


async def dead_letter(
    bus_url: str, unique: Callable[[str], str], n: int
) -> tuple[MessageBus, Flaky, DeadLetterQueue, list[str]]:
    """A started bus whose group dead-lettered ``n`` InvoiceIssued events (ids returned)."""
    handler = Flaky()
    group = unique("billing")
    bus = MessageBus(group, bus_url)
    await bus.subscribe(InvoiceIssued, handler.handler(), retry=NO_RETRY)
    await bus.start()
    ids = [await bus.publish(InvoiceIssued(invoice_id=f"inv-{i}", seq=i)) for i in range(n)]
    dlq = DeadLetterQueue(bus.transport, group, InvoiceIssued)
    await wait_count(dlq, n)
    return bus, handler, dlq, ids


async def test_list_peeks_without_removing(bus_url: str, unique: Callable[[str], str]) -> None:
    bus, handler, dlq, ids = await dead_letter(bus_url, unique, 5)
    try:
        dead = await dlq.list()
        assert [d.message_id for d in dead] == ids  # oldest first
        first = dead[0]
        assert first.source == "banyan"
        assert first.reason == "handler-failed"
        assert first.exception_type == "RuntimeError"
        assert first.exception_message == "ledger unavailable for inv-0"
        assert first.traceback is not None
        assert "ledger unavailable" in first.traceback
        assert first.handler is not None
        assert first.handler.endswith("post_to_ledger")
        assert first.group == dlq.group
        assert first.attempts == 1
        assert first.first_failure is not None
        assert first.first_failure == first.last_failure
        assert (first.message_type, first.version) == ("InvoiceIssued", 1)
        assert first.envelope is not None
        assert first.envelope["payload"] == {"invoiceId": "inv-0", "seq": 0}
        assert first.original_exchange == "exchange.platform.events"
        assert first.original_routing_key == "invoiceissued"

        assert [d.message_id for d in await dlq.list(limit=2)] == ids[:2]
        # Peeking again and again neither loses nor reorders anything (a quorum DLQ
        # counts each give-back as a delivery; it has no limit to hit).
        for _ in range(25):
            assert len(await dlq.list(limit=3)) == 3
        assert await dlq.count() == 5
        assert sorted(d.message_id or "" for d in await dlq.list()) == sorted(ids)
        found = await dlq.find(ids[3])
        assert found is not None
        assert found.envelope is not None
        assert found.envelope["payload"] == {"invoiceId": "inv-3", "seq": 3}
        assert await dlq.find("evt_nope") is None
        assert await dlq.count() == 5
        assert handler.handled == []
    finally:
        await bus.stop()


async def test_replay_reaches_the_fixed_group_once_and_no_other_group(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    others: list[str] = []

    async def other_group(event: InvoiceIssued, ctx: MessageContext) -> None:
        others.append(ctx.id)

    other = MessageBus(unique("audit"), bus_url)
    await other.subscribe(InvoiceIssued, other_group)
    await other.start()
    bus, handler, dlq, ids = await dead_letter(bus_url, unique, 50)
    try:
        await wait_until(lambda: len(others) == 50, what="the other group's 50")
        handler.broken = False  # "deploy the fix"
        result = await dlq.replay()
        assert result.ok
        assert sorted(result.replayed) == sorted(ids)
        await wait_until(lambda: len(handler.handled) >= 50, what="50 replayed handled")
        await asyncio.sleep(0.3)  # a duplicate, or a copy to the other group, would show now
        assert duplicates(handler.handled) == {}
        assert sorted(handler.handled) == sorted(ids)  # original ids: idempotency still works
        assert sorted(others) == sorted(ids)  # the other group saw each event once, originally
        assert await dlq.count() == 0
        for ctx in handler.contexts:
            assert ctx.attempt == 1
            assert not any(key.startswith("x-banyan-") for key in ctx.headers), ctx.headers
            assert "x-death" not in ctx.headers
    finally:
        await bus.stop()
        await other.stop()


async def test_replay_by_ids_or_predicate_leaves_the_rest(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bus, handler, dlq, ids = await dead_letter(bus_url, unique, 6)
    try:
        handler.broken = False
        result = await dlq.replay(ids=[ids[1], ids[4], "evt_not_there"])
        assert sorted(result.replayed) == sorted([ids[1], ids[4]])
        assert result.missing == ["evt_not_there"]
        assert result.failed == {}
        assert not result.ok
        await wait_count(dlq, 4)

        def odd_seq(dead: DeadLetter) -> bool:
            payload = dead.envelope["payload"] if dead.envelope else None
            return isinstance(payload, dict) and payload["seq"] % 2 == 1

        result = await dlq.replay(where=odd_seq)
        assert result.replayed == [ids[3], ids[5]]
        assert result.ok
        await wait_until(lambda: len(handler.handled) == 4, what="4 replayed")
        assert sorted(handler.handled) == sorted([ids[1], ids[3], ids[4], ids[5]])
        assert [d.message_id for d in await dlq.list()] == [ids[0], ids[2]]
        # ids and where together: both must accept
        result = await dlq.replay(ids=[ids[0], ids[2]], where=lambda d: d.message_id == ids[2])
        assert result.replayed == [ids[2]]
        await wait_until(lambda: len(handler.handled) == 5, what="5 replayed")
        assert [d.message_id for d in await dlq.list()] == [ids[0]]
    finally:
        await bus.stop()


async def test_a_message_that_fails_again_returns_with_a_fresh_record(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bus, _handler, dlq, ids = await dead_letter(bus_url, unique, 1)
    try:
        before = (await dlq.list())[0]
        result = await dlq.replay()  # still broken
        assert result.replayed == ids
        await wait_count(dlq, 1)
        again = (await dlq.list())[0]
        assert again.message_id == ids[0]
        assert again.attempts == 1  # replay reset the attempts; it failed on its first
        assert again.reason == "handler-failed"
        assert before.last_failure is not None
        assert again.last_failure is not None
        assert again.last_failure >= before.last_failure
        assert again.body == before.body
    finally:
        await bus.stop()


async def test_replay_to_a_deleted_exchange_leaves_everything_in_the_dlq(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bus, _handler, dlq, ids = await dead_letter(bus_url, unique, 5)
    await bus.stop()
    admin = make_transport(bus_url, name=unique("admin"))
    await admin.connect()
    try:
        dlq = DeadLetterQueue(admin, dlq.group, InvoiceIssued)
        before = await dlq.list()
        await admin.delete_exchange(dlq.target_exchange)
        result = await dlq.replay()
        assert result.replayed == []
        assert sorted(result.failed) == sorted(ids)
        for error in result.failed.values():
            assert dlq.target_exchange in error
            assert "does not exist" in error
        assert await dlq.count() == 5
        assert [without_delivery_count(d) for d in await dlq.list()] == [
            without_delivery_count(d) for d in before
        ]  # untouched, failure records and all
    finally:
        await admin.close()


async def test_replay_that_reaches_no_queue_leaves_everything_in_the_dlq(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    """The exchange is there but its queue is gone: a mandatory publish comes back."""
    bus, _handler, dlq, ids = await dead_letter(bus_url, unique, 3)
    await bus.stop()
    admin = make_transport(bus_url, name=unique("admin"))
    await admin.connect()
    try:
        dlq = DeadLetterQueue(admin, dlq.group, InvoiceIssued)
        await admin.delete_queue(dlq.target_exchange)  # the group queue has the same name
        result = await dlq.replay()
        assert result.replayed == []
        assert sorted(result.failed) == sorted(ids)
        for error in result.failed.values():
            assert "reached no queue" in error
        assert await dlq.count() == 3
        assert [d.reason for d in await dlq.list()] == ["handler-failed"] * 3
    finally:
        await admin.close()


async def test_the_bus_keeps_publishing_after_a_failed_replay(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    """A replay that fails must not break the connection it shares with the service."""
    seen: list[str] = []

    async def on_voided(event: InvoiceVoided) -> None:
        seen.append(event.invoice_id)

    bus, _handler, dlq, _ids = await dead_letter(bus_url, unique, 2)
    try:
        await bus.subscribe(InvoiceVoided, on_voided)
        await bus.transport.delete_exchange(dlq.target_exchange)
        result = await dlq.replay()
        assert len(result.failed) == 2
        await bus.publish(InvoiceVoided(invoice_id="right-after"))
        await wait_until(lambda: seen == ["right-after"], what="publish after a failed replay")
    finally:
        await bus.stop()


async def test_purge_by_id_then_everything(bus_url: str, unique: Callable[[str], str]) -> None:
    bus, _handler, dlq, ids = await dead_letter(bus_url, unique, 5)
    try:
        assert await dlq.purge(ids=[ids[0], ids[3], "evt_not_there"]) == 2
        assert [d.message_id for d in await dlq.list()] == [ids[1], ids[2], ids[4]]
        assert await dlq.purge(where=lambda d: d.message_id == ids[4]) == 1
        assert await dlq.purge() == 2
        assert await dlq.count() == 0
        assert await dlq.list() == []
        result = await dlq.replay()
        assert result.ok
        assert result.replayed == []
    finally:
        await bus.stop()


async def test_broker_side_dead_letters_are_read_and_replayed(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    """A message the group queue dead-lettered itself (here: rejected) has only x-death."""
    handled: list[str] = []
    reject = True

    async def handle(event: InvoiceIssued, ctx: MessageContext) -> None:
        if reject:
            await ctx.reject()
        else:
            handled.append(ctx.id)
            await ctx.ack()

    group = unique("billing")
    bus = MessageBus(group, bus_url)
    sub = await bus.subscribe(InvoiceIssued, handle, auto_ack=False, retry=NO_RETRY)
    async with bus:
        message_id = await bus.publish(InvoiceIssued(invoice_id="inv-r"))
        dlq = DeadLetterQueue(bus.transport, group, "InvoiceIssued")
        await wait_count(dlq, 1)
        [dead] = await dlq.list()
        assert dead.source == "broker"
        assert dead.reason == "rejected"
        assert dead.message_id == message_id
        assert dead.group == group
        assert dead.original_exchange == "exchange.platform.events"
        assert dead.original_routing_key == "invoiceissued"
        assert dead.last_failure is not None
        assert dead.exception_type is None
        assert dead.handler is None
        deaths = dead.headers["x-death"]
        assert isinstance(deaths, list)
        assert isinstance(deaths[0], dict)
        assert deaths[0]["queue"] == sub.queue_name
        reject = False
        assert (await dlq.replay()).replayed == [message_id]
        await wait_until(lambda: handled == [message_id], what="replayed broker dead-letter")
        assert await dlq.count() == 0


async def test_an_unknown_dlq_is_an_error_that_says_so(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    async with MessageBus(unique("svc"), bus_url) as bus:
        dlq = DeadLetterQueue(bus.transport, unique("nobody"), InvoiceIssued)
        with pytest.raises(TopologyError, match="does not exist"):
            await dlq.count()
        with pytest.raises(TopologyError, match="does not exist"):
            await dlq.list()
        with pytest.raises(ValueError, match="limit"):
            await dlq.list(limit=0)


async def test_concurrent_peeks_never_lose_a_message(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bus, _handler, dlq, ids = await dead_letter(bus_url, unique, 10)
    try:
        seen = await asyncio.gather(*(dlq.list() for _ in range(4)))
        everything = [d.message_id for batch in seen for d in batch]
        assert set(everything) <= set(ids)
        assert max(Counter(everything).values()) <= 4
        assert await dlq.count() == 10
    finally:
        await bus.stop()
