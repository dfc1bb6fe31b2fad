"""Routing at the seam: exchange types, exchange-to-exchange bindings, consistent hash,
mandatory publishes and missing entities. Runs on memory:// and on RabbitMQ."""

from __future__ import annotations

import pytest

from banyan_bus.errors import PublishError, TopologyError, Unroutable
from banyan_bus.transport.base import Transport
from tests.transport.seam import drain, msg, queue_with_exchange


async def test_direct_fanout_and_default_exchange(transport: Transport) -> None:
    t = transport
    await t.declare_exchange("d", "direct")
    await t.declare_exchange("f", "fanout")
    await queue_with_exchange(t, "q1", "d", "red")
    await queue_with_exchange(t, "q2", "d", "blue")
    await t.bind_queue("q1", "f")
    await t.bind_queue("q2", "f")
    await t.publish("d", "red", msg("r"))
    await t.publish("d", "green", msg("g"))  # no binding: dropped silently
    await t.publish("f", "anything", msg("all"))
    await t.publish("", "q2", msg("direct-to-q2"))
    assert await drain(t, "q1") == [b"r", b"all"]
    assert await drain(t, "q2") == [b"all", b"direct-to-q2"]


async def test_topic_wildcards(transport: Transport) -> None:
    t = transport
    await t.declare_exchange("t", "topic")
    await queue_with_exchange(t, "star", "t", "order.*")
    await queue_with_exchange(t, "hash", "t", "order.#")
    await queue_with_exchange(t, "levels", "t", "*.*.1.#")
    for key in ("order", "order.paid", "order.paid.late", "x.y.1.dest", "x.y.0.dest"):
        await t.publish("t", key, msg(key))
    assert await drain(t, "star") == [b"order.paid"]
    assert await drain(t, "hash") == [b"order", b"order.paid", b"order.paid.late"]
    assert await drain(t, "levels") == [b"x.y.1.dest"]


async def test_exchange_bindings_deliver_one_copy_per_queue(transport: Transport) -> None:
    t = transport
    for name in ("root", "x1", "x2"):
        await t.declare_exchange(name, "topic")
    await t.bind_exchange("x1", "root", "order.*")
    await t.bind_exchange("x2", "root", "#")
    await t.bind_exchange("x2", "x1", "#")
    await t.bind_exchange("root", "x2", "#")  # a cycle: must not loop
    await queue_with_exchange(t, "q", "x1", "#")
    await t.bind_queue("q", "x2", "order.created")
    await t.bind_queue("q", "root", "#")
    await t.publish("root", "order.created", msg("once"))
    assert await drain(t, "q") == [b"once"]


async def test_consistent_hash_keeps_a_key_on_one_queue_and_spreads(
    transport: Transport,
) -> None:
    t = transport
    await t.declare_exchange("ch", "x-consistent-hash", arguments={"hash-header": "pk"})
    for i in range(4):
        await queue_with_exchange(t, f"part-{i}", "ch", "1")
    for n in range(100):
        await t.publish("ch", "ignored", msg(f"m{n}", headers={"pk": f"key-{n % 10}"}))
    seen: dict[str, set[str]] = {}
    for i in range(4):
        while (d := await t.get(f"part-{i}")) is not None:
            seen.setdefault(str(d.headers["pk"]), set()).add(f"part-{i}")
            await d.ack()
    assert len(seen) == 10
    assert all(len(queues) == 1 for queues in seen.values())  # a key never splits
    assert len(set().union(*seen.values())) >= 3  # keys spread over the partitions


async def test_consistent_hash_binding_weight_must_be_a_positive_int(
    transport: Transport, on_memory: bool
) -> None:
    await transport.declare_exchange("ch", "x-consistent-hash")
    await transport.declare_queue("q")
    with pytest.raises(TopologyError) as raised:
        await transport.bind_queue("q", "ch", "heavy")
    if on_memory:
        assert "weight" in str(raised.value)


async def test_mandatory_unroutable_and_missing_exchange(transport: Transport) -> None:
    t = transport
    await t.declare_exchange("x", "topic")
    await t.publish("x", "nobody.listens", msg())  # not mandatory: silently dropped
    with pytest.raises(Unroutable, match=r"'x'.*'nobody\.listens'"):
        await t.publish("x", "nobody.listens", msg(), mandatory=True)
    with pytest.raises(PublishError, match="'missing'"):
        await t.publish("missing", "k", msg())
    with pytest.raises(TopologyError, match="'nope'"):
        await t.bind_queue("nope", "x")
    await t.declare_queue("q")
    with pytest.raises(TopologyError, match="'missing'"):
        await t.bind_queue("q", "missing")
    with pytest.raises(TopologyError, match="'missing'"):
        await t.bind_exchange("missing", "x")
    # The transport is still usable after the broker refused those (AMQP closed a channel).
    await t.publish("", "q", msg("after"))
    assert await drain(t, "q") == [b"after"]
