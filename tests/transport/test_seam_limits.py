"""Queue limits at the seam: priority lanes, quorum queues refusing priorities,
max-length with reject-publish and drop-head. Runs on memory:// and RabbitMQ."""

from __future__ import annotations

import pytest

from banyan_bus.errors import BusCapacityExceeded, TopologyError
from banyan_bus.transport.base import Transport
from tests.transport.seam import drain, msg, queue_with_exchange, settle_count


async def test_priority_order_with_a_backlog(transport: Transport) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-max-priority": 5})
    for body, priority in [("p0", None), ("p5a", 5), ("p9", 9), ("p2", 2), ("p5b", 5), ("p0b", 0)]:
        await t.publish("", "q", msg(body, priority=priority))
    assert await drain(t, "q") == [b"p5a", b"p9", b"p5b", b"p2", b"p0", b"p0b"]  # 9 clamps to 5


async def test_quorum_queue_refuses_priority(transport: Transport) -> None:
    with pytest.raises(TopologyError, match="x-max-priority"):
        await transport.declare_queue(
            "q", arguments={"x-queue-type": "quorum", "x-max-priority": 5}
        )


async def test_max_length_reject_publish_raises_and_keeps_first(
    transport: Transport, on_memory: bool
) -> None:
    t = transport
    await t.declare_exchange("fan", "fanout")
    await queue_with_exchange(
        t, "small", "fan", arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
    )
    await queue_with_exchange(t, "big", "fan")
    for n in range(3):
        await t.publish("fan", "", msg(str(n)))
    for n in range(3, 5):
        with pytest.raises(BusCapacityExceeded, match="full") as raised:
            await t.publish("fan", "", msg(str(n)))
        if on_memory:  # RabbitMQ's nack does not say which queue refused
            assert "'small'" in str(raised.value)
    assert await drain(t, "small") == [b"0", b"1", b"2"]
    assert await drain(t, "big") == [b"0", b"1", b"2", b"3", b"4"]  # like RabbitMQ


async def test_quorum_max_length_reject_publish_admits_one_over_then_reopens_at_80_percent(
    transport: Transport,
) -> None:
    """rabbit_fifo checks the limit after an enqueue (so a quorum queue of max-length
    N takes N+1), then refuses publishes until it has drained to its soft limit,
    trunc(0.8 * N) ready messages."""
    t = transport
    await t.declare_queue(
        "q",
        arguments={"x-queue-type": "quorum", "x-max-length": 5, "x-overflow": "reject-publish"},
    )
    for n in range(6):
        await t.publish("", "q", msg(str(n)))
    with pytest.raises(BusCapacityExceeded):
        await t.publish("", "q", msg("refused"))
    d = await t.get("q")
    assert d is not None
    await d.ack()
    await settle_count(t, "q", 5)  # at the limit, above the soft limit of 4
    with pytest.raises(BusCapacityExceeded):
        await t.publish("", "q", msg("still refused"))
    d = await t.get("q")
    assert d is not None
    await d.ack()
    await settle_count(t, "q", 4)  # at the soft limit: open again
    await t.publish("", "q", msg("accepted"))
    assert await drain(t, "q") == [b"2", b"3", b"4", b"5", b"accepted"]


async def test_max_length_drop_head_dead_letters_the_oldest(transport: Transport) -> None:
    t = transport
    await t.declare_queue("dropped")
    await t.declare_queue(
        "q",
        arguments={
            "x-max-length": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dropped",
        },
    )
    for body in ("a", "b", "c"):
        await t.publish("", "q", msg(body))
    assert await drain(t, "q") == [b"b", b"c"]
    dropped = await t.get("dropped")
    assert dropped is not None
    assert dropped.body == b"a"
    assert dropped.headers["x-first-death-reason"] == "maxlen"
