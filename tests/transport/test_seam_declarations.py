"""Declarations at the seam: idempotent re-declaration, mismatches named with both
argument sets, queue state, purge, delete. Runs on memory:// and RabbitMQ."""

from __future__ import annotations

import pytest

from banyan_bus.errors import TopologyMismatch, Unroutable
from banyan_bus.transport.base import Transport
from tests.transport.seam import msg, queue_with_exchange, settle_count


async def test_redeclare_is_idempotent_but_other_arguments_mismatch(
    transport: Transport, on_memory: bool
) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-message-ttl": 1000})
    await t.declare_queue("q", arguments={"x-message-ttl": 1000})
    with pytest.raises(TopologyMismatch) as raised:
        await t.declare_queue("q", arguments={"x-message-ttl": 2000})
    text = str(raised.value)
    assert "'q'" in text
    assert "1000" in text
    assert "2000" in text
    assert raised.value.kind == "queue"
    with pytest.raises(TopologyMismatch, match="durable"):
        await t.declare_queue("q", durable=False, arguments={"x-message-ttl": 1000})

    await t.declare_exchange("x", "topic")
    await t.declare_exchange("x", "topic")
    with pytest.raises(TopologyMismatch) as raised:
        await t.declare_exchange("x", "fanout")
    assert "'topic'" in str(raised.value)
    assert "'fanout'" in str(raised.value)
    if on_memory:  # RabbitMQ names only the argument that differs
        assert raised.value.existing == {"type": "topic", "durable": True}


async def test_queue_state_purge_and_delete(transport: Transport) -> None:
    t = transport
    await t.declare_exchange("x", "fanout")
    await queue_with_exchange(t, "q", "x")
    for _ in range(3):
        await t.publish("x", "", msg())
    held = await t.get("q")
    assert held is not None
    assert await t.queue_state("q") == await t.queue_state("q")
    state = await t.queue_state("q")
    assert state is not None
    assert (state.messages, state.consumers) == (2, 0)
    assert await t.purge_queue("q") == 2  # ready messages only
    await held.nack(requeue=True)
    await settle_count(t, "q", 1)
    await t.delete_queue("q")
    assert await t.queue_state("q") is None
    await t.publish("x", "", msg())  # the binding went with the queue
    with pytest.raises(Unroutable):
        await t.publish("x", "", msg(), mandatory=True)
    await t.delete_exchange("x")
    assert not await t.exchange_exists("x")
    assert await t.exchange_exists("amq.direct")  # predeclared in every vhost
    assert not await t.exchange_exists("")  # RabbitMQ refuses to declare the default exchange
