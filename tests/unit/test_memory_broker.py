"""The memory:// emulator's own internals: what only it has, or only it can show.

Its claims about RabbitMQ (routing, dead-lettering, delivery limit, max-length,
priority, TTL, settling) are not here: ``tests/transport`` runs them on both
transports, against a real RabbitMQ. What stays here: topic matching as a pure
function, the hash ring's determinism across brokers, the process-wide registry,
the ``close_all_connections`` fault hook, and what the emulator refuses to fake.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator

import pytest

from banyan_bus.errors import ConfigurationError, TopologyError
from banyan_bus.transport.memory import (
    MemoryDelivery,
    MemoryTransport,
    get_broker,
    reset_brokers,
    topic_matches,
)
from banyan_bus.transport.memory.queue import Message, Queue
from tests.transport.seam import Collector, msg

TIMEOUT = 2.0


def _url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    t = MemoryTransport(_url())
    await t.connect()
    yield t
    await t.close()


async def queue_with_exchange(t: MemoryTransport, queue: str, exchange: str, key: str) -> None:
    await t.declare_queue(queue)
    await t.bind_queue(queue, exchange, key)


# -- routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*", "", False),
        ("*", "a", True),
        ("*.b", ".b", True),  # the empty word is a word
        ("a.*.c", "a..c", True),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "ab", False),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.b.c", False),
        ("#.#", "a", True),
        ("*.#", "", False),
        ("#.*", "a.b", True),
        ("", "", True),
        ("", "a", False),
        ("a.b", "a.B", False),
        ("a+b.c", "a+b.c", True),  # regex characters are literal
        ("*.*.1.#", "x.y.1.dest", True),
        ("*.*.1.#", "x.y.0.dest", False),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_consistent_hash_is_stable_and_spreads() -> None:
    async def assignment() -> dict[str, set[str]]:
        t = MemoryTransport(_url())
        await t.connect()
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
        await t.close()
        return seen

    first = await assignment()
    assert len(first) == 10
    assert all(len(queues) == 1 for queues in first.values())  # a key never splits
    assert len(set().union(*first.values())) >= 3  # keys spread over the partitions
    assert await assignment() == first  # deterministic across brokers


# -- what the emulator refuses to fake ---------------------------------------------------


async def test_headers_exchange_is_refused(transport: MemoryTransport) -> None:
    """The bus never declares one; memory:// refuses it rather than half-emulating it."""
    with pytest.raises(TopologyError, match="'headers'"):
        await transport.declare_exchange("h", "headers")  # type: ignore[arg-type]


async def test_max_length_bytes_is_refused(transport: MemoryTransport) -> None:
    with pytest.raises(TopologyError, match="x-max-length-bytes"):
        await transport.declare_queue("q", arguments={"x-max-length-bytes": 1024})


# -- rooms -------------------------------------------------------------------------------


def test_a_queue_needs_no_broker_only_its_callbacks() -> None:
    """A queue gets its dead-letter callback and sequence from whoever builds it."""
    dead: list[tuple[str, bytes, str]] = []
    queue = Queue(
        "q",
        True,
        {"x-max-length": 1},
        dead_letter=lambda q, m, reason: dead.append((q.name, m.properties.body, reason)),
        sequence=itertools.count(),
    )
    assert queue.offer(msg("a"), "", "q", False)
    assert queue.offer(msg("b"), "", "q", False)  # drop-head: "a" goes
    assert dead == [("q", b"a", "maxlen")]
    assert queue.ready == 1


async def test_a_reply_is_settled_on_arrival() -> None:
    reply = MemoryDelivery.reply(msg("r", correlation_id="c1"), "", "amq.rabbitmq.reply-to.x")
    assert reply.settled
    assert (reply.body, reply.correlation_id, reply.redelivered) == (b"r", "c1", False)
    with pytest.raises(RuntimeError, match="already settled"):
        await reply.ack()


def test_a_delivery_reports_the_quorum_delivery_count() -> None:
    queue = Queue(
        "q", True, {"x-queue-type": "quorum"}, dead_letter=lambda *_: None, sequence=iter([0])
    )
    delivery = MemoryDelivery(Message(msg("m"), "", "q", seq=0, returns=2), queue)
    assert delivery.headers["x-delivery-count"] == 2
    assert not delivery.settled


# -- connections -----------------------------------------------------------------------


async def test_close_all_connections_is_a_broker_fault() -> None:
    url = _url()
    t = MemoryTransport(url)
    await t.connect()
    await t.declare_queue("q")
    held = Collector(ack=False)
    await t.consume("q", held, prefetch=1)
    await t.publish("", "q", msg("a"))
    await held.wait_for(1)
    get_broker(url).close_all_connections()
    with pytest.raises(RuntimeError, match="transport is closed"):
        await t.queue_state("q")
    await t.connect()  # a reconnect finds the message back in its queue
    state = await t.queue_state("q")
    assert state is not None
    assert state.messages == 1
    assert state.consumers == 0
    redelivered = await t.get("q")
    assert redelivered is not None
    assert redelivered.redelivered
    await t.close()


async def test_transports_with_one_url_share_a_broker() -> None:
    url = _url()
    a, b, other = MemoryTransport(url), MemoryTransport(url), MemoryTransport(_url())
    for t in (a, b, other):
        await t.connect()
    await a.declare_exchange("x", "fanout")
    assert await b.exchange_exists("x")
    assert not await other.exchange_exists("x")
    assert a.display_url == url
    for t in (a, b, other):
        await t.close()


def test_bad_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        MemoryTransport("amqp://localhost")


async def test_reset_brokers_drops_everything() -> None:
    url = _url()
    t = MemoryTransport(url)
    await t.connect()
    await t.declare_exchange("x", "topic")
    reset_brokers()
    await t.connect()
    assert not await t.exchange_exists("x")
    await t.close()
