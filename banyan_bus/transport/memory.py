"""The ``memory://`` transport: an in-process emulation of a RabbitMQ 3.10 broker.

Everything above the transport seam is written in AMQP nouns, so the embedded
default transport emulates the broker instead of short-cutting the bus: the
same exchanges, queues and bindings route the same messages, queue arguments
(TTL, dead-lettering, max-length, priority, delivery limit, single active
consumer) act as RabbitMQ's do, and deliveries settle like AMQP deliveries.
A topology or retry bug therefore shows on ``memory://`` as it would on a real
broker, and users can unit-test handlers without one.

All transports with the same URL in one process share one :class:`MemoryBroker`,
so two buses ("two services") in one process talk to each other. The broker is
single-threaded: every operation runs synchronously on the event loop, and
consumers are fed from ``loop.call_soon`` so a publish never runs a handler inline.

Where RabbitMQ's behaviour is subtle, the emulation follows it deliberately:
``x-death`` headers and dead-letter cycle detection match ``rabbit_dead_letter``;
requeued messages go back to their original position; only ready messages
count towards ``x-max-length`` and only ready messages expire.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import itertools
import logging
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Final

from banyan_bus.errors import (
    BusCapacityExceeded,
    ConfigurationError,
    PublishError,
    TopologyError,
    TopologyMismatch,
    Unroutable,
)
from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Arguments,
    Consumer,
    Delivery,
    DeliveryCallback,
    ExchangeType,
    Headers,
    HeaderValue,
    OutgoingMessage,
    QueueState,
    Transport,
)

__all__ = [
    "MemoryBroker",
    "MemoryDelivery",
    "MemoryTransport",
    "get_broker",
    "reset_brokers",
    "topic_matches",
]

log = logging.getLogger(__name__)

SCHEME: Final = "memory://"
_EXCHANGE_TYPES: Final = frozenset({"topic", "direct", "fanout", "headers", "x-consistent-hash"})
_PREDECLARED: Final = {"amq.direct": "direct", "amq.fanout": "fanout", "amq.topic": "topic"}
_OVERFLOWS: Final = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
_X_MATCH: Final = frozenset({"all", "any", "all-with-x", "any-with-x"})
#: Ring points per unit of binding weight: enough that a few queues share keys evenly.
_POINTS_PER_WEIGHT: Final = 64


# -- routing helpers -------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _topic_regex(pattern: str) -> re.Pattern[str]:
    """Compile a topic binding key into a regex over keys written as ``word.word.``.

    Terminating every word with a dot makes ``#`` ("zero or more words") a plain
    repetition of ``[^.]*\\.``, so empty words and ``a.#.b`` need no special case.
    """
    parts: list[str] = []
    words = pattern.split(".") if pattern else []
    for previous, word in zip([None, *words], words, strict=False):
        if word == "#":
            if previous != "#":  # '#.#' means '#'; collapsing avoids regex backtracking
                parts.append(r"(?:[^.]*\.)*")
        elif word == "*":
            parts.append(r"[^.]*\.")
        else:
            parts.append(re.escape(word) + r"\.")
    return re.compile("".join(parts))


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on '.', ``*`` one word, ``#`` zero or more.

    As in RabbitMQ, the empty key has zero words and ``a..b`` has an empty middle word.
    """
    return _topic_regex(pattern).fullmatch(routing_key + "." if routing_key else "") is not None


def _headers_match(arguments: Mapping[str, HeaderValue], headers: Headers) -> bool:
    mode = str(arguments.get("x-match", "all"))
    with_x = mode.endswith("-with-x")
    pairs = [
        (k, v)
        for k, v in arguments.items()
        if k != "x-match" and (with_x or not k.startswith("x-"))
    ]
    # A binding value of None (AMQP void) asks only that the header be present.
    hits = (k in headers and (v is None or headers[k] == v) for k, v in pairs)
    return any(hits) if mode.startswith("any") else all(hits)


def _hash_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


def _copy_headers(headers: Headers) -> Headers:
    """Copy so that each queue (and each delivery) owns its headers, nested ones too."""
    return {k: copy.deepcopy(v) if isinstance(v, list | dict) else v for k, v in headers.items()}


def _int_arg(where: str, arguments: Arguments, key: str, high: int | None = None) -> int | None:
    value = arguments.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TopologyError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    if high is not None and value > high:
        raise TopologyError(f"{where}: {key} must be at most {high}, got {value!r}")
    return value


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # close_all_connections() may be called outside the loop
        return None


def _expiry(now: float, queue_ttl_ms: int | None, message_ttl_ms: int | None) -> float | None:
    """Queue TTL and per-message ``expiration``: the earlier wins, as on RabbitMQ."""
    ttls = [t for t in (queue_ttl_ms, message_ttl_ms) if t is not None]
    return now + min(ttls) / 1000 if ttls else None


def _now() -> float:
    loop = _running_loop()
    return loop.time() if loop is not None else time.monotonic()


# -- dead-lettering (rabbit_dead_letter semantics) ------------------------------------


def _with_death(message: _Message, queue: str, reason: str) -> Headers:
    """The headers RabbitMQ gives a dead-lettered message: an ``x-death`` entry per
    (queue, reason), counted and moved to the front on repeats, and the
    ``x-first-death-*`` headers on the first death only."""
    headers = dict(message.properties.headers)
    previous = headers.get("x-death")
    deaths: list[HeaderValue] = list(previous) if isinstance(previous, list) else []
    count = 1
    for death in deaths:
        if isinstance(death, dict) and (death.get("queue"), death.get("reason")) == (queue, reason):
            old = death.get("count")
            count = old + 1 if isinstance(old, int) else 1
            break
    rest = [
        d
        for d in deaths
        if not (isinstance(d, dict) and (d.get("queue"), d.get("reason")) == (queue, reason))
    ]
    if not isinstance(previous, list):
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = message.exchange
    entry: dict[str, HeaderValue] = {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": datetime.now(UTC).replace(microsecond=0),
        "exchange": message.exchange,
        "routing-keys": [message.routing_key],
    }
    headers["x-death"] = [entry, *rest]
    return headers


def _is_cycle(headers: Headers, target: str) -> bool:
    """RabbitMQ drops a dead-lettered message on a fully automatic cycle: it died in
    ``target`` before and nothing on the way since was a rejection by a client."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return False
    for death in deaths:
        if not isinstance(death, dict) or death.get("reason") == "rejected":
            return False
        if death.get("queue") == target:
            return True
    return False


# -- broker entities -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Binding:
    destination: str
    to_exchange: bool
    routing_key: str
    arguments: dict[str, HeaderValue]


class _Exchange:
    __slots__ = ("_ring", "arguments", "bindings", "durable", "name", "type")

    def __init__(
        self, name: str, type: str, durable: bool, arguments: dict[str, HeaderValue]
    ) -> None:
        self.name = name
        self.type = type
        self.durable = durable
        self.arguments = arguments
        self.bindings: list[_Binding] = []
        self._ring: tuple[list[int], list[_Binding]] | None = None

    def describe(self) -> dict[str, object]:
        return {"type": self.type, "durable": self.durable, **self.arguments}

    def bind(self, binding: _Binding) -> None:
        if binding not in self.bindings:  # AMQP: an identical binding is a no-op
            self.bindings.append(binding)
            self._ring = None

    def unbind(self, destination: str, to_exchange: bool) -> None:
        kept = [
            b for b in self.bindings if (b.destination, b.to_exchange) != (destination, to_exchange)
        ]
        if len(kept) != len(self.bindings):
            self.bindings = kept
            self._ring = None

    def matching(self, routing_key: str, message: OutgoingMessage) -> list[_Binding]:
        if self.type == "direct":
            return [b for b in self.bindings if b.routing_key == routing_key]
        if self.type == "topic":
            return [b for b in self.bindings if topic_matches(b.routing_key, routing_key)]
        if self.type == "fanout":
            return list(self.bindings)
        if self.type == "headers":
            return [b for b in self.bindings if _headers_match(b.arguments, message.headers)]
        chosen = self._hash_lookup(self._hash_input(routing_key, message))
        return [] if chosen is None else [chosen]

    def _hash_input(self, routing_key: str, message: OutgoingMessage) -> bytes:
        # Like the plugin: a missing header hashes as "undefined", so all such
        # messages land on one queue rather than being dropped.
        header = self.arguments.get("hash-header")
        if isinstance(header, str):
            return _hash_bytes(message.headers.get(header))
        return routing_key.encode()

    def _hash_lookup(self, key: bytes) -> _Binding | None:
        """Pick the binding owning the first ring point at or after the key's hash.

        Points derive from the destination's name (not binding order), so a key
        keeps its queue across restarts and re-declarations.
        """
        if self._ring is None:
            points: list[tuple[int, int]] = []
            for index, b in enumerate(self.bindings):
                kind = "e" if b.to_exchange else "q"
                for i in range(int(b.routing_key) * _POINTS_PER_WEIGHT):
                    points.append((zlib.crc32(f"{kind}:{b.destination}:{i}".encode()), index))
            points.sort()
            self._ring = ([p for p, _ in points], [self.bindings[i] for _, i in points])
        hashes, owners = self._ring
        if not hashes:
            return None
        return owners[bisect.bisect_left(hashes, zlib.crc32(key)) % len(hashes)]


@dataclass(slots=True, eq=False)
class _Message:
    """One message on one queue; ``seq`` is its original position for requeues."""

    properties: OutgoingMessage
    exchange: str
    routing_key: str
    seq: int
    priority: int = 0
    expires_at: float | None = None
    redelivered: bool = False
    returns: int = 0  # quorum queues' delivery count: requeues and connection losses


class _Queue:
    """A queue: priority lanes of ready messages, its consumers, its TTL timer."""

    def __init__(
        self, broker: MemoryBroker, name: str, durable: bool, arguments: Arguments
    ) -> None:
        where = f"queue {name!r}"
        self.broker = broker
        self.name = name
        self.durable = durable
        self.arguments: dict[str, HeaderValue] = dict(arguments)
        queue_type = arguments.get("x-queue-type", "classic")
        if queue_type not in ("classic", "quorum"):
            raise TopologyError(f"{where}: unsupported x-queue-type {queue_type!r}")
        self.quorum = queue_type == "quorum"
        self._overflowing = False
        if self.quorum and not durable:
            raise TopologyError(f"{where}: quorum queues must be durable (PRECONDITION_FAILED)")
        if self.quorum and "x-max-priority" in arguments:
            raise TopologyError(
                f"{where}: quorum queues do not support x-max-priority on RabbitMQ 3.10 "
                f"(PRECONDITION_FAILED); declare a classic queue for priorities"
            )
        self.max_priority = _int_arg(where, arguments, "x-max-priority", 255) or 0
        self.max_length = _int_arg(where, arguments, "x-max-length")
        self.max_bytes = _int_arg(where, arguments, "x-max-length-bytes")
        self.ttl_ms = _int_arg(where, arguments, "x-message-ttl")
        self.delivery_limit = _int_arg(where, arguments, "x-delivery-limit")
        if not self.quorum:
            self.delivery_limit = None  # only quorum queues count deliveries
        self.overflow = arguments.get("x-overflow", "drop-head")
        if self.overflow not in _OVERFLOWS:
            raise TopologyError(f"{where}: unknown x-overflow {self.overflow!r}")
        dlx, dlrk = (
            arguments.get("x-dead-letter-exchange"),
            arguments.get("x-dead-letter-routing-key"),
        )
        if not isinstance(dlx, str | None) or not isinstance(dlrk, str | None):
            raise TopologyError(f"{where}: dead-letter exchange and routing key must be strings")
        if dlrk is not None and dlx is None:
            raise TopologyError(f"{where}: x-dead-letter-routing-key needs x-dead-letter-exchange")
        self.dead_letter_exchange, self.dead_letter_routing_key = dlx, dlrk
        # RabbitMQ only honours at-least-once with reject-publish; it keeps a message
        # until a target takes it. In memory we enqueue it even into a full target.
        self.at_least_once = (
            self.quorum
            and arguments.get("x-dead-letter-strategy") == "at-least-once"
            and self.overflow == "reject-publish"
        )
        sac = arguments.get("x-single-active-consumer", False)
        if not isinstance(sac, bool):
            raise TopologyError(f"{where}: x-single-active-consumer must be a boolean")
        self.single_active = sac
        self.lanes: list[deque[_Message]] = [deque() for _ in range(self.max_priority + 1)]
        self.ready = 0
        self.ready_bytes = 0
        self.consumers: list[_MemoryConsumer] = []
        self.next_consumer = 0
        self.deleted = False
        self._dispatch_loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> dict[str, object]:
        args = {k: v for k, v in self.arguments.items() if (k, v) != ("x-queue-type", "classic")}
        return {"durable": self.durable, **args}

    # -- enqueueing

    def offer(
        self, properties: OutgoingMessage, exchange: str, routing_key: str, force: bool
    ) -> bool:
        """Enqueue a copy; False when ``reject-publish`` overflow refused it."""
        now = _now()
        message = _Message(
            properties=replace(properties, headers=_copy_headers(properties.headers)),
            exchange=exchange,
            routing_key=routing_key,
            seq=next(self.broker.sequence),
            priority=min(max(properties.priority or 0, 0), self.max_priority),
            expires_at=_expiry(now, self.ttl_ms, properties.expiration),
        )
        size = len(properties.body)
        if not force and self.overflow != "drop-head" and self._refuses(size):
            if self.overflow == "reject-publish-dlx":
                self.broker.dead_letter(self, message, "maxlen")
            return False
        self._add(message, len(self.lanes[message.priority]))
        # drop-head drops what would be delivered next (for priority queues: the
        # oldest message of the highest priority), dead-lettering it as "maxlen".
        while self.overflow == "drop-head" and self._over_limit(0, 0):
            head = self._take_head()
            if head is not None:
                self.broker.dead_letter(self, head, "maxlen")
        self._changed()
        return True

    def requeue(self, message: _Message) -> None:
        """Return an unacked message to its original position (ahead of newer ones)."""
        if self.deleted:
            return
        message.redelivered = True
        if self.quorum:
            message.returns += 1
            if self.delivery_limit is not None and message.returns > self.delivery_limit:
                self.broker.dead_letter(self, message, "delivery_limit")
                return
        lane = self.lanes[message.priority]
        index = next((i for i, m in enumerate(lane) if m.seq > message.seq), len(lane))
        self._add(message, index)
        self._changed()

    def _refuses(self, size: int) -> bool:
        """Whether reject-publish overflow refuses one more message.

        Quorum queues follow RabbitMQ's rabbit_fifo: the limit is checked before
        the enqueue against what is already there (so N+1 fit), and once over it
        the queue refuses until it drains below 80% of the limit.
        """
        if not self.quorum:
            return self._over_limit(1, size)
        if self._overflowing:
            self._overflowing = self._over_limit(0, 0) or (
                self.max_length is not None and self.ready >= 0.8 * self.max_length
            )
        else:
            self._overflowing = self._over_limit(0, 0)
        return self._overflowing

    def _over_limit(self, extra: int, extra_bytes: int) -> bool:
        return (self.max_length is not None and self.ready + extra > self.max_length) or (
            self.max_bytes is not None and self.ready_bytes + extra_bytes > self.max_bytes
        )

    def _add(self, message: _Message, index: int) -> None:
        self.lanes[message.priority].insert(index, message)
        self.ready += 1
        self.ready_bytes += len(message.properties.body)

    def _take_head(self) -> _Message | None:
        for lane in reversed(self.lanes):  # highest priority first, FIFO within
            if lane:
                message = lane.popleft()
                self.ready -= 1
                self.ready_bytes -= len(message.properties.body)
                return message
        return None

    def purge(self) -> int:
        count = self.ready
        for lane in self.lanes:
            lane.clear()
        self.ready = self.ready_bytes = 0
        return count

    def _changed(self) -> None:
        self.schedule_expiry()
        self.kick()

    # -- expiry: one timer for the earliest head; a message behind the head never
    #    expires sooner because every message of the queue shares the TTL.

    def schedule_expiry(self) -> None:
        loop = _running_loop()
        if self.ttl_ms is None or self.deleted or loop is None:
            return
        heads = [lane[0].expires_at for lane in self.lanes if lane]
        deadline = min((h for h in heads if h is not None), default=None)
        if deadline is None:
            return
        if self._timer is not None:
            # An earlier timer on this loop is enough: it finds nothing due and re-arms.
            # (A timer of another, closed loop - a previous test's - would never fire.)
            if self._timer_loop is loop and self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._expire)
        self._timer_at = deadline
        self._timer_loop = loop

    def _expire(self) -> None:
        self._timer = None
        now = _now()
        for lane in self.lanes:
            while lane and lane[0].expires_at is not None and lane[0].expires_at <= now:
                message = lane.popleft()
                self.ready -= 1
                self.ready_bytes -= len(message.properties.body)
                self.broker.dead_letter(self, message, "expired")
        self.schedule_expiry()

    # -- dispatch

    def kick(self) -> None:
        """Schedule one drain of ready messages to consumers on the next loop turn."""
        if self.deleted or not self.ready or not self.consumers:
            return
        loop = _running_loop()
        if loop is None or self._dispatch_loop is loop:
            return
        self._dispatch_loop = loop
        loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_loop = None
        if self.deleted:
            return
        while self.ready and (consumer := self._pick_consumer()) is not None:
            message = self.take_live()
            if message is None:
                break
            consumer.deliver(message)
        self.schedule_expiry()

    def take_live(self) -> _Message | None:
        """The next message to deliver; ones past their TTL are expired on the way."""
        now = _now()
        while (message := self._take_head()) is not None:
            if message.expires_at is None or message.expires_at > now:
                return message
            self.broker.dead_letter(self, message, "expired")
        return None

    def _pick_consumer(self) -> _MemoryConsumer | None:
        if not self.consumers:
            return None
        if self.single_active:  # the earliest registered consumer is the active one
            first = self.consumers[0]
            return first if first.has_capacity() else None
        count = len(self.consumers)
        for step in range(count):
            index = (self.next_consumer + step) % count
            if self.consumers[index].has_capacity():
                self.next_consumer = (index + 1) % count
                return self.consumers[index]
        return None

    def remove_consumer(self, consumer: _MemoryConsumer) -> None:
        if consumer in self.consumers:
            index = self.consumers.index(consumer)
            del self.consumers[index]
            if index < self.next_consumer:
                self.next_consumer -= 1
            self.next_consumer = self.next_consumer % len(self.consumers) if self.consumers else 0
            self.kick()  # single-active-consumer: the next one takes over

    def delete(self) -> None:
        self.deleted = True
        self.purge()
        if self._timer is not None:
            self._timer.cancel()
        for consumer in list(self.consumers):
            consumer.detach()


class _ReplyDelivery(Delivery):
    """A direct reply-to delivery: settled on arrival, like RabbitMQ's no-ack replies."""

    __slots__ = ()

    def __init__(self, props: OutgoingMessage, exchange: str, routing_key: str) -> None:
        super().__init__(
            body=props.body,
            headers=_copy_headers(props.headers),
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            message_type=props.message_type,
            timestamp=props.timestamp,
            priority=props.priority,
            content_type=props.content_type,
            reply_to=props.reply_to,
            redelivered=False,
            exchange=exchange,
            routing_key=routing_key,
        )

    @property
    def settled(self) -> bool:
        return True

    async def ack(self) -> None:
        raise RuntimeError("a reply is settled on arrival")

    async def nack(self, *, requeue: bool = True) -> None:
        raise RuntimeError("a reply is settled on arrival")

    async def reject(self) -> None:
        raise RuntimeError("a reply is settled on arrival")


class MemoryDelivery(Delivery):
    """A delivery from a memory queue; settles like an AMQP delivery tag."""

    __slots__ = ("_connection", "_consumer", "_message", "_queue", "_settled")

    def __init__(
        self,
        message: _Message,
        queue: _Queue,
        connection: _Connection,
        consumer: _MemoryConsumer | None,
    ) -> None:
        props = message.properties
        headers = _copy_headers(props.headers)
        if queue.quorum and message.returns:
            headers["x-delivery-count"] = message.returns
        super().__init__(
            body=props.body,
            headers=headers,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            message_type=props.message_type,
            timestamp=props.timestamp,
            priority=props.priority,
            content_type=props.content_type,
            reply_to=props.reply_to,
            redelivered=message.redelivered,
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        self._message = message
        self._queue = queue
        self._connection = connection
        self._consumer = consumer
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def stale(self) -> bool:
        return self._connection.closed

    def _settle(self) -> _Queue:
        if self._settled:
            raise RuntimeError(f"delivery {self.message_id!r} is already settled")
        if self._connection.closed:
            raise RuntimeError("delivery's connection is closed")
        self._settled = True
        del self._connection.unacked[self]
        if self._consumer is not None:
            self._consumer.unacked -= 1
        return self._queue

    def return_to_queue(self) -> None:
        """The connection closed under this delivery: the broker requeues it."""
        if not self._settled:
            self._queue.requeue(self._message)

    async def ack(self) -> None:
        self._settle().kick()

    async def nack(self, *, requeue: bool = True) -> None:
        queue = self._settle()
        if requeue:
            queue.requeue(self._message)
        elif not queue.deleted:
            queue.broker.dead_letter(queue, self._message, "rejected")
        queue.kick()

    async def reject(self) -> None:
        await self.nack(requeue=False)


class _MemoryConsumer(Consumer):
    def __init__(
        self,
        connection: _Connection,
        queue: _Queue,
        callback: DeliveryCallback,
        prefetch: int,
    ) -> None:
        self.connection = connection
        self.queue = queue
        self.callback = callback
        self.prefetch = prefetch  # 0 = unlimited, as in basic.qos
        self.unacked = 0
        self.cancelled = False

    def has_capacity(self) -> bool:
        return self.prefetch == 0 or self.unacked < self.prefetch

    def deliver(self, message: _Message) -> None:
        delivery = MemoryDelivery(message, self.queue, self.connection, self)
        self.unacked += 1
        self.connection.unacked[delivery] = None
        self.connection.broker.spawn(self.callback, delivery)

    async def cancel(self) -> None:
        """basic.cancel: no new deliveries; unsettled ones stay with this consumer."""
        self.detach()

    def detach(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.connection.consumers.discard(self)
        self.queue.remove_consumer(self)


class _Connection:
    """One ``connect()`` of a transport: what the broker drops when it closes."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.closed = False
        self.unacked: dict[MemoryDelivery, None] = {}  # insertion order = delivery order
        self.consumers: set[_MemoryConsumer] = set()
        self.reply_addresses: list[str] = []
        self.lost_callbacks: list[Callable[[], None]] = []

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.broker.connections.discard(self)
        for address in self.reply_addresses:
            self.broker.reply_routes.pop(address, None)
        for consumer in list(self.consumers):
            consumer.detach()
        returned, self.unacked = list(self.unacked), {}
        for delivery in returned:
            delivery.return_to_queue()
        for callback in self.lost_callbacks:
            callback()


class MemoryBroker:
    """One in-process broker (a "vhost"), shared by every transport with its URL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.exchanges: dict[str, _Exchange] = {"": _Exchange("", "direct", True, {})}
        for exchange_name, exchange_type in _PREDECLARED.items():
            self.exchanges[exchange_name] = _Exchange(exchange_name, exchange_type, True, {})
        self.queues: dict[str, _Queue] = {}
        self.connections: set[_Connection] = set()
        self.sequence = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Every publish to an exchange, in order, when ``recording`` (banyan_bus.testing).
        self.recording = False
        self.journal: list[tuple[str, str, OutgoingMessage]] = []
        #: Direct reply-to addresses: routing key on the default exchange -> callback.
        self.reply_routes: dict[str, Callable[[Delivery], None]] = {}

    def busy(self) -> bool:
        """Whether a consumed queue still holds work: ready messages or unacked ones."""
        if any(connection.unacked for connection in self.connections):
            return True
        return any(queue.ready and queue.consumers for queue in self.queues.values())

    def close_all_connections(self) -> None:
        """Fault hook (``rabbitmqctl close_all_connections``): every transport's
        consumers stop, its unacked messages return to their queues, it is closed."""
        for connection in list(self.connections):
            connection.close()

    def open_connection(self) -> _Connection:
        connection = _Connection(self)
        self.connections.add(connection)
        return connection

    def exchange(self, name: str, action: str) -> _Exchange:
        found = self.exchanges.get(name)
        if found is None:
            raise TopologyError(f"cannot {action}: exchange {name!r} does not exist (NOT_FOUND)")
        return found

    def queue(self, name: str, action: str) -> _Queue:
        found = self.queues.get(name)
        if found is None:
            raise TopologyError(f"cannot {action}: queue {name!r} does not exist (NOT_FOUND)")
        return found

    def route(self, source: _Exchange, routing_key: str, message: OutgoingMessage) -> list[_Queue]:
        """Every queue the message reaches, each once, following exchange bindings."""
        if source.name == DEFAULT_EXCHANGE:
            queue = self.queues.get(routing_key)
            return [] if queue is None else [queue]
        found: dict[str, _Queue] = {}
        visited: set[str] = set()  # also what stops exchange-binding cycles
        pending = [source]
        while pending:
            exchange = pending.pop()
            if exchange.name in visited:
                continue
            visited.add(exchange.name)
            for binding in exchange.matching(routing_key, message):
                if binding.to_exchange:
                    if (nxt := self.exchanges.get(binding.destination)) is not None:
                        pending.append(nxt)
                elif (queue := self.queues.get(binding.destination)) is not None:
                    found.setdefault(queue.name, queue)
        return list(found.values())

    def dead_letter(self, queue: _Queue, message: _Message, reason: str) -> None:
        """Republish through the queue's dead-letter exchange, or drop without one."""
        if queue.dead_letter_exchange is None:
            return
        target = self.exchanges.get(queue.dead_letter_exchange)
        if target is None:
            log.warning(
                "queue %r dead-letters to exchange %r, which does not exist: message dropped",
                queue.name,
                queue.dead_letter_exchange,
            )
            return
        routing_key = queue.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        properties = replace(message.properties, headers=_with_death(message, queue.name, reason))
        for destination in self.route(target, routing_key, properties):
            if reason == "rejected" or not _is_cycle(properties.headers, destination.name):
                destination.offer(properties, target.name, routing_key, queue.at_least_once)

    def spawn(self, callback: DeliveryCallback, delivery: MemoryDelivery) -> None:
        """Run the callback in its own task, like aio-pika; keep a reference so it lives."""
        task = asyncio.get_running_loop().create_task(_run_callback(callback, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self) -> None:
        self.close_all_connections()
        for queue in self.queues.values():
            queue.delete()


async def _run_callback(callback: DeliveryCallback, delivery: MemoryDelivery) -> None:
    try:
        await callback(delivery)
    except Exception:  # the delivery stays unacked, as with aio-pika
        log.exception("consumer callback raised for message %r", delivery.message_id)


_brokers: dict[str, MemoryBroker] = {}


def _broker_name(url: str) -> str:
    if not url.startswith(SCHEME):
        raise ConfigurationError(f"not a memory transport URL: {url!r} (use 'memory://[name]')")
    return url[len(SCHEME) :].strip("/")


def get_broker(url: str) -> MemoryBroker:
    """The process-wide broker for ``memory://<name>``, created on first use."""
    name = _broker_name(url)
    broker = _brokers.get(name)
    if broker is None:
        broker = _brokers[name] = MemoryBroker(name)
    return broker


def drop_broker(url: str) -> None:
    """Close and forget the broker of ``url`` (a test's private broker)."""
    broker = _brokers.pop(_broker_name(url), None)
    if broker is not None:
        broker.shutdown()


def reset_brokers() -> None:
    """Drop every broker (tests): their connections close, their timers stop."""
    for broker in list(_brokers.values()):
        broker.shutdown()
    _brokers.clear()


class MemoryTransport(Transport):
    """The seam on a :class:`MemoryBroker`; ``connect`` opens a "connection" to it."""

    def __init__(self, url: str = SCHEME) -> None:
        _broker_name(url)  # validate early
        self.url = url
        self.display_url = url
        self.broker = get_broker(url)
        self._connection: _Connection | None = None

    def _open(self) -> _Connection:
        connection = self._connection
        if connection is None or connection.closed:
            raise RuntimeError(f"transport is closed ({self.display_url}); call connect() first")
        return connection

    async def connect(self) -> None:
        if self._connection is None or self._connection.closed:
            self.broker = get_broker(self.url)  # a fresh one after reset_brokers()
            self._connection = self.broker.open_connection()

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def on_connection_lost(self, callback: Callable[[], None]) -> None:
        self._open().lost_callbacks.append(callback)

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None:
        self._open()
        args = dict(arguments or {})
        existing = self.broker.exchanges.get(name)
        if existing is not None:
            requested: dict[str, object] = {"type": type, "durable": durable, **args}
            if existing.describe() != requested:
                raise TopologyMismatch("exchange", name, existing.describe(), requested)
            return
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise TopologyError(f"exchange name {name!r} is reserved (ACCESS_REFUSED)")
        if type not in _EXCHANGE_TYPES:
            raise TopologyError(f"exchange {name!r}: unknown exchange type {type!r}")
        self.broker.exchanges[name] = _Exchange(name, type, durable, args)

    async def declare_queue(
        self, name: str, *, durable: bool = True, arguments: Arguments | None = None
    ) -> None:
        self._open()
        if not name or name.startswith("amq."):
            raise TopologyError(f"queue name {name!r} is empty or reserved (ACCESS_REFUSED)")
        queue = _Queue(self.broker, name, durable, arguments or {})
        existing = self.broker.queues.get(name)
        if existing is None:
            self.broker.queues[name] = queue
        elif existing.describe() != queue.describe():
            raise TopologyMismatch("queue", name, existing.describe(), queue.describe())

    async def bind_queue(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments | None = None
    ) -> None:
        self._open()
        self.broker.queue(queue, f"bind queue {queue!r}")
        self._bind(exchange, _Binding(queue, False, routing_key, dict(arguments or {})))

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        self._open()
        self.broker.exchange(destination, f"bind exchange {destination!r}")
        self._bind(source, _Binding(destination, True, routing_key, dict(arguments or {})))

    def _bind(self, source: str, binding: _Binding) -> None:
        action = f"bind {binding.destination!r} to {source!r}"
        exchange = self.broker.exchange(source, action)
        if source == DEFAULT_EXCHANGE:
            raise TopologyError(f"cannot {action}: the default exchange takes no bindings")
        if exchange.type == "x-consistent-hash":
            weight = binding.routing_key
            if not (weight.isascii() and weight.isdigit()) or int(weight) < 1:
                raise TopologyError(f"cannot {action}: the weight {weight!r} must be an int >= 1")
        x_match = binding.arguments.get("x-match", "all")
        if exchange.type == "headers" and x_match not in _X_MATCH:
            raise TopologyError(f"cannot {action}: invalid x-match {x_match!r}")
        exchange.bind(binding)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: OutgoingMessage,
        *,
        confirm: bool = True,
        mandatory: bool = False,
    ) -> None:
        connection = self._connection
        if connection is None or connection.closed:
            raise PublishError(f"transport to {self.display_url} is closed; nothing was sent")
        if exchange == DEFAULT_EXCHANGE and routing_key in self.broker.reply_routes:
            reply = self.broker.reply_routes[routing_key]
            delivery = _ReplyDelivery(message, exchange, routing_key)
            asyncio.get_running_loop().call_soon(reply, delivery)
            return
        source = self.broker.exchanges.get(exchange)
        if source is None:
            raise PublishError(
                f"cannot publish to exchange {exchange!r} on {self.display_url}: it does not "
                f"exist (NOT_FOUND); nothing was sent"
            )
        if self.broker.recording:
            self.broker.journal.append((exchange, routing_key, message))
        queues = self.broker.route(source, routing_key, message)
        if not queues and mandatory:
            raise Unroutable(
                f"{message.message_type or 'message'} {message.message_id} published to "
                f"exchange {exchange!r} with routing key {routing_key!r} reached no queue"
            )
        refused = [q.name for q in queues if not q.offer(message, exchange, routing_key, False)]
        if refused:
            raise BusCapacityExceeded(
                f"queue(s) {', '.join(map(repr, refused))} are full (x-max-length with "
                f"reject-publish) and refused {message.message_type or 'a message'} "
                f"({message.message_id}) published to {exchange!r} with routing key "
                f"{routing_key!r}. Slow the publisher or drain the queue."
            )

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        connection = self._open()
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 = unlimited), got {prefetch}")
        target = self.broker.queue(queue, f"consume from {queue!r}")
        consumer = _MemoryConsumer(connection, target, callback, prefetch)
        target.consumers.append(consumer)
        connection.consumers.add(consumer)
        target.kick()
        return consumer

    async def start_replies(self, callback: Callable[[Delivery], None]) -> str:
        connection = self._open()
        address = f"amq.rabbitmq.reply-to.{uuid.uuid4().hex}"
        self.broker.reply_routes[address] = callback
        connection.reply_addresses.append(address)
        return address

    async def get(self, queue: str) -> Delivery | None:
        connection = self._open()
        target = self.broker.queue(queue, f"get from {queue!r}")
        message = target.take_live()
        target.schedule_expiry()
        if message is None:
            return None
        delivery = MemoryDelivery(message, target, connection, None)
        connection.unacked[delivery] = None
        return delivery

    async def queue_state(self, queue: str) -> QueueState | None:
        self._open()
        found = self.broker.queues.get(queue)
        if found is None:
            return None
        return QueueState(name=queue, messages=found.ready, consumers=len(found.consumers))

    async def exchange_exists(self, name: str) -> bool:
        self._open()
        return name in self.broker.exchanges

    async def purge_queue(self, queue: str) -> int:
        self._open()
        return self.broker.queue(queue, f"purge {queue!r}").purge()

    async def delete_queue(self, queue: str) -> None:
        self._open()
        found = self.broker.queues.pop(queue, None)
        if found is not None:
            found.delete()
            for exchange in self.broker.exchanges.values():
                exchange.unbind(queue, to_exchange=False)

    async def delete_exchange(self, name: str) -> None:
        self._open()
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise TopologyError(f"exchange {name!r} cannot be deleted (ACCESS_REFUSED)")
        if self.broker.exchanges.pop(name, None) is not None:
            for exchange in self.broker.exchanges.values():
                exchange.unbind(name, to_exchange=True)
