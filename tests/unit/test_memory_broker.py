"""The memory:// broker emulation behaves like RabbitMQ 3.10 where the bus relies on it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from banyan_bus.errors import (
    BusCapacityExceeded,
    ConfigurationError,
    PublishError,
    SettleError,
    TopologyError,
    TopologyMismatch,
    Unroutable,
)
from banyan_bus.transport.base import Arguments, Delivery, OutgoingMessage
from banyan_bus.transport.memory import (
    MemoryTransport,
    get_broker,
    reset_brokers,
    topic_matches,
)

TIMEOUT = 2.0


def _url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    t = MemoryTransport(_url())
    await t.connect()
    yield t
    await t.close()


def msg(body: bytes | str = b"x", **kwargs: object) -> OutgoingMessage:
    data = body.encode() if isinstance(body, str) else body
    return OutgoingMessage(body=data, message_id=data.decode(), **kwargs)  # type: ignore[arg-type]


class Collector:
    """A consumer callback that records deliveries and (optionally) acks them."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.deliveries: list[Delivery] = []
        self._changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self._changed.set()
        if self.ack:
            await delivery.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    async def wait_for(self, count: int, within: float = TIMEOUT) -> list[Delivery]:
        async def until() -> None:
            while len(self.deliveries) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), within)
        return self.deliveries


async def eventually(check: Callable[[], Awaitable[bool]], within: float = TIMEOUT) -> None:
    async def until() -> None:
        while not await check():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(until(), within)


async def drain(t: MemoryTransport, queue: str) -> list[bytes]:
    """Take every ready message of ``queue`` with basic.get, acking each."""
    bodies = []
    while (d := await t.get(queue)) is not None:
        bodies.append(d.body)
        await d.ack()
    return bodies


async def queue_with_exchange(
    t: MemoryTransport,
    queue: str,
    exchange: str = "",
    key: str = "",
    arguments: Arguments | None = None,
) -> None:
    await t.declare_queue(queue, arguments=arguments)
    if exchange:
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


async def test_direct_fanout_and_default_exchange(transport: MemoryTransport) -> None:
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


async def test_exchange_bindings_deliver_one_copy_per_queue(transport: MemoryTransport) -> None:
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


async def test_consistent_hash_binding_weight_must_be_a_positive_int(
    transport: MemoryTransport,
) -> None:
    await transport.declare_exchange("ch", "x-consistent-hash")
    await transport.declare_queue("q")
    with pytest.raises(TopologyError, match="weight"):
        await transport.bind_queue("q", "ch", "heavy")


async def test_mandatory_unroutable_and_missing_exchange(transport: MemoryTransport) -> None:
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


# -- consumers -------------------------------------------------------------------------


async def test_publish_does_not_run_consumers_inline(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q")
    seen = Collector()
    await t.consume("q", seen, prefetch=10)
    await t.publish("", "q", msg("a"))
    assert seen.deliveries == []
    await seen.wait_for(1)
    assert seen.bodies == [b"a"]
    assert seen.deliveries[0].exchange == ""
    assert seen.deliveries[0].routing_key == "q"


async def test_prefetch_bounds_unacked_deliveries(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q")
    for n in range(20):
        await t.publish("", "q", msg(str(n)))
    in_flight = 0
    peak = 0
    done = asyncio.Event()
    handled: list[bytes] = []

    async def slow(delivery: Delivery) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        handled.append(delivery.body)
        await delivery.ack()
        if len(handled) == 20:
            done.set()

    await t.consume("q", slow, prefetch=3)
    await asyncio.wait_for(done.wait(), TIMEOUT)
    assert peak == 3
    assert handled == [str(n).encode() for n in range(20)]

    await t.declare_queue("q2")
    held = Collector(ack=False)
    for n in range(5):
        await t.publish("", "q2", msg(str(n)))
    await t.consume("q2", held, prefetch=2)
    await held.wait_for(2)
    await asyncio.sleep(0.02)
    assert len(held.deliveries) == 2  # the rest wait for a free slot
    await held.deliveries[0].ack()
    await held.wait_for(3)


async def test_round_robin_between_consumers(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q")
    consumers = [Collector() for _ in range(3)]
    for c in consumers:
        await t.consume("q", c, prefetch=10)
    for n in range(9):
        await t.publish("", "q", msg(str(n)))
    for c in consumers:
        await c.wait_for(3)
    assert [c.bodies for c in consumers] == [
        [b"0", b"3", b"6"],
        [b"1", b"4", b"7"],
        [b"2", b"5", b"8"],
    ]


async def test_priority_order_with_a_backlog(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-max-priority": 5})
    for body, priority in [("p0", None), ("p5a", 5), ("p9", 9), ("p2", 2), ("p5b", 5), ("p0b", 0)]:
        await t.publish("", "q", msg(body, priority=priority))
    assert await drain(t, "q") == [b"p5a", b"p9", b"p5b", b"p2", b"p0", b"p0b"]  # 9 clamps to 5


async def test_quorum_queue_refuses_priority(transport: MemoryTransport) -> None:
    with pytest.raises(TopologyError, match="x-max-priority"):
        await transport.declare_queue(
            "q", arguments={"x-queue-type": "quorum", "x-max-priority": 5}
        )


async def test_single_active_consumer_fails_over_on_cancel(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-single-active-consumer": True})
    first, second = Collector(), Collector()
    first_consumer = await t.consume("q", first, prefetch=5)
    await t.consume("q", second, prefetch=5)
    for n in range(4):
        await t.publish("", "q", msg(str(n)))
    await first.wait_for(4)
    assert second.deliveries == []
    await first_consumer.cancel()
    await t.publish("", "q", msg("after"))
    await second.wait_for(1)
    assert second.bodies == [b"after"]
    state = await t.queue_state("q")
    assert state is not None
    assert state.consumers == 1


# -- settling --------------------------------------------------------------------------


async def test_nack_requeue_redelivers_at_the_front(transport: MemoryTransport) -> None:
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
    again = await t.get("q")
    assert again is not None
    assert again.body == b"a"
    assert again.redelivered
    await again.ack()
    assert await drain(t, "q") == [b"b", b"c"]


async def test_settling_twice_raises(transport: MemoryTransport) -> None:
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


async def test_reject_dead_letters_with_x_death(transport: MemoryTransport) -> None:
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


async def test_reject_without_dead_letter_exchange_drops(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q")
    await t.publish("", "q", msg())
    d = await t.get("q")
    assert d is not None
    await d.nack(requeue=False)
    assert await t.get("q") is None


async def test_delivery_limit_dead_letters_after_n_requeues(transport: MemoryTransport) -> None:
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
        state = await t.queue_state("dlq")
        return state is not None and state.messages == 1

    await eventually(dead_lettered)
    assert counts == [None, 1, 2]  # delivered limit + 1 times
    dead = await t.get("dlq")
    assert dead is not None
    death = dead.headers["x-death"]
    assert isinstance(death, list)
    assert isinstance(death[0], dict)
    assert death[0]["reason"] == "delivery_limit"


# -- TTL and delay levels --------------------------------------------------------------


async def test_ttl_expires_in_fifo_order_into_dead_letter_queue(
    transport: MemoryTransport,
) -> None:
    t = transport
    await t.declare_queue("expired")
    await t.declare_queue(
        "wait",
        arguments={
            "x-message-ttl": 100,
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
    state = await t.queue_state("wait")
    assert state is not None
    assert state.messages == 3
    await dead.wait_for(3)
    assert loop.time() - start >= 0.1
    assert dead.bodies == [b"a", b"b", b"c"]
    death = dead.deliveries[0].headers["x-death"]
    assert isinstance(death, list)
    assert isinstance(death[0], dict)
    assert death[0]["reason"] == "expired"
    assert death[0]["queue"] == "wait"


async def test_unacked_messages_do_not_expire(transport: MemoryTransport) -> None:
    t = transport
    await t.declare_queue("q", arguments={"x-message-ttl": 30})
    await t.publish("", "q", msg("held"))
    d = await t.get("q")
    assert d is not None
    await asyncio.sleep(0.06)
    await d.nack(requeue=True)  # back, but already past its TTL: expires at the head
    await asyncio.sleep(0.01)
    assert await t.get("q") is None


async def test_chain_of_ttl_queues_works_as_delay_levels(transport: MemoryTransport) -> None:
    t = transport
    # level-1 holds 100 ms, then dead-letters to level-0's exchange (50 ms), then to delivery.
    for name in ("level-1", "level-0", "delivery"):
        await t.declare_exchange(name, "topic")
    await t.declare_queue(
        "level-1", arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "level-0"}
    )
    await t.declare_queue(
        "level-0", arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "delivery"}
    )
    await t.bind_queue("level-1", "level-1", "1.*.#")
    await t.bind_exchange("level-0", "level-1", "0.*.#")
    await t.bind_queue("level-0", "level-0", "*.1.#")
    await t.bind_exchange("delivery", "level-0", "*.0.#")
    await queue_with_exchange(t, "target", "delivery", "#.target")
    arrived = Collector()
    await t.consume("target", arrived, prefetch=10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await t.publish("level-1", "1.1.target", msg("both"))  # 150 ms
    await t.publish("level-1", "0.1.target", msg("short"))  # 50 ms
    await t.publish("level-1", "0.0.target", msg("now"))  # straight through
    await arrived.wait_for(3)
    assert arrived.bodies == [b"now", b"short", b"both"]
    assert loop.time() - start >= 0.15
    death = arrived.deliveries[2].headers["x-death"]
    assert isinstance(death, list)
    assert [(d["queue"], d["reason"]) for d in death if isinstance(d, dict)] == [
        ("level-0", "expired"),
        ("level-1", "expired"),
    ]
    assert arrived.deliveries[2].routing_key == "1.1.target"


async def test_fully_automatic_dead_letter_cycle_is_dropped(transport: MemoryTransport) -> None:
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
    await asyncio.sleep(0.08)
    state = await t.queue_state("loop")
    assert state is not None
    assert state.messages == 0


async def test_dead_letter_cycle_detection_reads_republished_x_death(
    transport: MemoryTransport,
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
    await t.publish("", "hold", msg("first"))
    await eventually(lambda: _has_messages(t, "next", 1))
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
    await eventually(lambda: _has_messages(t, "next", 1))
    await asyncio.sleep(0.05)
    assert await drain(t, "next") == [b"clean"]


async def _has_messages(t: MemoryTransport, queue: str, count: int) -> bool:
    state = await t.queue_state(queue)
    return state is not None and state.messages >= count


# -- max-length ------------------------------------------------------------------------


async def test_max_length_reject_publish_raises_and_keeps_first(
    transport: MemoryTransport,
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
        with pytest.raises(BusCapacityExceeded, match="'small'"):
            await t.publish("fan", "", msg(str(n)))
    assert await drain(t, "small") == [b"0", b"1", b"2"]
    assert await drain(t, "big") == [b"0", b"1", b"2", b"3", b"4"]  # like RabbitMQ


async def test_max_length_drop_head_dead_letters_the_oldest(transport: MemoryTransport) -> None:
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


# -- connections -----------------------------------------------------------------------


async def test_close_returns_unacked_messages_to_the_queue() -> None:
    url = _url()
    one, two = MemoryTransport(url), MemoryTransport(url)
    await one.connect()
    await two.connect()
    await one.declare_queue("q")
    held = Collector(ack=False)
    await one.consume("q", held, prefetch=10)
    for body in ("a", "b", "c"):
        await two.publish("", "q", msg(body))
    await held.wait_for(3)
    await held.deliveries[0].ack()
    await one.close()
    with pytest.raises(SettleError, match="connection is closed"):
        await held.deliveries[1].ack()
    with pytest.raises(RuntimeError, match="transport is closed"):
        await one.declare_queue("q")
    with pytest.raises(PublishError):
        await one.publish("", "q", msg())
    again = Collector()
    await two.consume("q", again, prefetch=10)
    await again.wait_for(2)
    assert again.bodies == [b"b", b"c"]
    assert all(d.redelivered for d in again.deliveries)
    await two.close()


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


# -- declarations ----------------------------------------------------------------------


async def test_redeclare_is_idempotent_but_other_arguments_mismatch(
    transport: MemoryTransport,
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
    assert raised.value.existing == {"type": "topic", "durable": True}


async def test_queue_state_purge_and_delete(transport: MemoryTransport) -> None:
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
    state = await t.queue_state("q")
    assert state is not None
    assert state.messages == 1
    await t.delete_queue("q")
    assert await t.queue_state("q") is None
    await t.publish("x", "", msg())  # the binding went with the queue
    with pytest.raises(Unroutable):
        await t.publish("x", "", msg(), mandatory=True)
    await t.delete_exchange("x")
    assert not await t.exchange_exists("x")
    assert await t.exchange_exists("")
