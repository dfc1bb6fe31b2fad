"""TTL at the seam: FIFO expiry into a dead-letter queue, unacked messages do not expire,
chains of TTL queues (the delay levels), dead-letter cycles. Runs on memory:// and RabbitMQ."""

from __future__ import annotations

import asyncio

from banyan_bus.transport.base import Transport
from tests.transport.seam import Collector, drain, eventually, msg, ready


async def test_ttl_expires_in_fifo_order_into_dead_letter_queue(transport: Transport) -> None:
    t = transport
    await t.declare_queue("expired")
    await t.declare_queue(
        "wait",
        arguments={
            "x-message-ttl": 300,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "expired",
        },
    )
    dead = Collector()
    await t.consume("expired", dead, prefetch=10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for body in ("a", "b", "c"):
        await t.publish("", "wait", msg(body))
        await asyncio.sleep(0.02)
    assert await ready(t, "wait") == 3
    await dead.wait_for(3)
    assert loop.time() - start >= 0.3
    assert dead.bodies == [b"a", b"b", b"c"]
    death = dead.deliveries[0].headers["x-death"]
    assert isinstance(death, list)
    assert isinstance(death[0], dict)
    assert death[0]["reason"] == "expired"
    assert death[0]["queue"] == "wait"


async def test_unacked_messages_do_not_expire(transport: Transport) -> None:
    t = transport
    await t.declare_queue("expired")
    await t.declare_queue(
        "q",
        arguments={
            "x-message-ttl": 30,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "expired",
        },
    )
    await t.publish("", "q", msg("held"))
    d = await t.get("q")
    assert d is not None
    await asyncio.sleep(0.1)
    assert await ready(t, "expired") == 0  # held by a client: not expired
    await d.nack(requeue=True)  # back, but already past its TTL: expires at the head

    async def expired() -> bool:
        return await ready(t, "expired") == 1

    await eventually(expired)
    assert await t.get("q") is None


async def test_chain_of_ttl_queues_works_as_delay_levels(transport: Transport) -> None:
    t = transport
    # level-1 holds 200 ms, then dead-letters to level-0's exchange (100 ms), then to delivery.
    for name in ("level-1", "level-0", "delivery"):
        await t.declare_exchange(name, "topic")
    await t.declare_queue(
        "level-1", arguments={"x-message-ttl": 200, "x-dead-letter-exchange": "level-0"}
    )
    await t.declare_queue(
        "level-0", arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "delivery"}
    )
    await t.bind_queue("level-1", "level-1", "1.*.#")
    await t.bind_exchange("level-0", "level-1", "0.*.#")
    await t.bind_queue("level-0", "level-0", "*.1.#")
    await t.bind_exchange("delivery", "level-0", "*.0.#")
    await t.declare_queue("target")
    await t.bind_queue("target", "delivery", "#.target")
    arrived = Collector()
    await t.consume("target", arrived, prefetch=10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await t.publish("level-1", "1.1.target", msg("both"))  # 300 ms
    await t.publish("level-1", "0.1.target", msg("short"))  # 100 ms
    await t.publish("level-1", "0.0.target", msg("now"))  # straight through
    await arrived.wait_for(3)
    assert arrived.bodies == [b"now", b"short", b"both"]
    assert loop.time() - start >= 0.3
    death = arrived.deliveries[2].headers["x-death"]
    assert isinstance(death, list)
    assert [(d["queue"], d["reason"]) for d in death if isinstance(d, dict)] == [
        ("level-0", "expired"),
        ("level-1", "expired"),
    ]
    assert arrived.deliveries[2].routing_key == "1.1.target"


async def test_fully_automatic_dead_letter_cycle_is_dropped(transport: Transport) -> None:
    t = transport
    # A queue expiring into itself: RabbitMQ detects the cycle and drops the message.
    await t.declare_queue(
        "loop",
        arguments={
            "x-message-ttl": 20,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "loop",
        },
    )
    await t.publish("", "loop", msg())
    await asyncio.sleep(0.2)
    assert await ready(t, "loop") == 0


async def test_dead_letter_cycle_detection_reads_republished_x_death(
    transport: Transport,
) -> None:
    """RabbitMQ 3.10 trusts an x-death header a client copied into a new publish.

    A message that expired out of ``hold`` into ``next`` before and is republished
    with that history is dropped on its second trip: whoever republishes (retries)
    must strip x-death, or the delay levels lose the message.
    """
    t = transport
    await t.declare_queue("next")
    await t.declare_queue(
        "hold",
        arguments={
            "x-message-ttl": 20,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "next",
        },
    )

    async def has_one() -> bool:
        return await ready(t, "next") >= 1

    await t.publish("", "hold", msg("first"))
    await eventually(has_one)
    first = await t.get("next")
    assert first is not None
    await first.ack()
    # "next" then expired it back into "hold" on the real path; here the copy claims so.
    history = dict(first.headers)
    history["x-death"] = [
        {"queue": "next", "reason": "expired", "count": 1},
        *first.headers["x-death"],  # type: ignore[misc]
    ]
    await t.publish("", "hold", msg("again", headers=history))
    await t.publish("", "hold", msg("clean", headers={}))
    await eventually(has_one)
    await asyncio.sleep(0.2)
    assert await drain(t, "next") == [b"clean"]
