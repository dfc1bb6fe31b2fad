"""Settling at the seam: requeue position, settling twice, dead-lettering with x-death,
the quorum delivery limit, and what a closed connection does to its deliveries.
Runs on memory:// and on RabbitMQ."""

from __future__ import annotations

import pytest

from banyan_bus.errors import PublishError, SettleError
from banyan_bus.transport.base import Delivery, Transport
from tests.transport.conftest import OpenTransport
from tests.transport.seam import Collector, drain, eventually, msg, ready, settle_count


async def test_nack_requeue_redelivers_at_the_front(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q")
    for body in ("a", "b", "c"):
        await t.publish("", "q", msg(body))
    a = await t.get("q")
    b = await t.get("q")
    assert a is not None
    assert b is not None
    assert not a.redelivered
    await b.nack(requeue=True)
    await a.nack(requeue=True)  # both go back to their original positions
    await settle_count(t, "q", 3)
    again = await t.get("q")
    assert again is not None
    assert again.body == b"a"
    assert again.redelivered
    await again.ack()
    assert await drain(t, "q") == [b"b", b"c"]


async def test_settling_twice_raises(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q")
    await t.publish("", "q", msg())
    d = await t.get("q")
    assert d is not None
    await d.ack()
    assert d.settled
    with pytest.raises(RuntimeError, match="already settled"):
        await d.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        await d.nack(requeue=True)


async def test_reject_dead_letters_with_x_death(transport: Transport) -> None:
    t = transport
    await t.declare_exchange("events", "topic")
    await t.declare_queue("dlq")
    await t.declare_queue(
        "work", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq"}
    )
    await t.bind_queue("work", "events", "order.*")
    await t.publish("events", "order.paid", msg("m", headers={"keep": "me"}))
    d = await t.get("work")
    assert d is not None
    await d.reject()
    await settle_count(t, "dlq", 1)
    dead = await t.get("dlq")
    assert dead is not None
    assert dead.body == b"m"
    assert dead.headers["keep"] == "me"
    assert dead.exchange == ""
    assert dead.routing_key == "dlq"
    death = dead.headers["x-death"]
    assert isinstance(death, list)
    assert len(death) == 1
    assert isinstance(death[0], dict)
    assert death[0]["queue"] == "work"
    assert death[0]["reason"] == "rejected"
    assert death[0]["count"] == 1
    assert death[0]["exchange"] == "events"
    assert death[0]["routing-keys"] == ["order.paid"]
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == "work"
    assert dead.headers["x-first-death-exchange"] == "events"


async def test_reject_without_dead_letter_exchange_drops(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q")
    await t.publish("", "q", msg())
    d = await t.get("q")
    assert d is not None
    await d.nack(requeue=False)
    assert await t.get("q") is None
    await t.publish("", "q", msg("next"))
    assert await drain(t, "q") == [b"next"]  # the rejected one never came back


async def test_delivery_limit_dead_letters_after_n_requeues(transport: Transport) -> None:
    t = transport
    await t.declare_queue("dlq", arguments={"x-queue-type": "quorum"})
    await t.declare_queue(
        "q",
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dlq",
        },
    )
    counts: list[object] = []

    async def fail(delivery: Delivery) -> None:
        counts.append(delivery.headers.get("x-delivery-count"))
        await delivery.nack(requeue=True)

    await t.consume("q", fail, prefetch=1)
    await t.publish("", "q", msg("poison"))

    async def dead_lettered() -> bool:
        return await ready(t, "dlq") == 1

    await eventually(dead_lettered)
    assert counts == [None, 1, 2]  # delivered limit + 1 times
    dead = await t.get("dlq")
    assert dead is not None
    death = dead.headers["x-death"]
    assert isinstance(death, list)
    assert isinstance(death[0], dict)
    assert death[0]["reason"] == "delivery_limit"


async def test_close_returns_unacked_messages_to_the_queue(
    open_transport: OpenTransport, on_memory: bool
) -> None:
    one, two = await open_transport(), await open_transport()
    await one.declare_queue("q")
    held = Collector(ack=False)
    await one.consume("q", held, prefetch=10)
    for body in ("a", "b", "c"):
        await two.publish("", "q", msg(body))
    await held.wait_for(3)
    await held.deliveries[0].ack()
    await one.close()
    assert held.deliveries[1].stale
    with pytest.raises(SettleError, match="is closed") as raised:
        await held.deliveries[1].ack()
    if on_memory:
        assert "connection is closed" in str(raised.value)
    assert held.deliveries[1].settled  # it counts as settled: settling again is a bug
    with pytest.raises(SettleError, match="is closed"):
        await held.deliveries[2].reject()
    with pytest.raises(RuntimeError) as raised_runtime:
        await one.declare_queue("q")
    if on_memory:
        assert "transport is closed" in str(raised_runtime.value)
    with pytest.raises(PublishError):
        await one.publish("", "q", msg())
    again = Collector()
    await two.consume("q", again, prefetch=10)
    await again.wait_for(2)
    assert again.bodies == [b"b", b"c"]
    assert all(d.redelivered for d in again.deliveries)
