"""Queues of the memory broker: ready messages, their order, their limits and their TTL.

A queue implements the arguments the bus declares, as RabbitMQ 3.10 does:
priority lanes (``x-max-priority``, classic queues only), ``x-message-ttl``,
``x-max-length`` with the three overflow behaviours, the quorum delivery limit
(``x-delivery-limit``), dead-lettering (``x-dead-letter-*``) and
``x-single-active-consumer``. Arguments it would only pretend to honour
(``x-max-length-bytes``) are refused instead.

Some RabbitMQ subtleties are followed on purpose, because the bus relies on
them: a requeued message goes back to its original position; only *ready*
messages count towards ``x-max-length`` and only ready messages expire; a
message behind the head never expires sooner than the head, since they share
the queue's TTL (which is why delay levels use queue-level TTLs at all).

A queue does not know its broker. It receives what it needs from it: the
dead-letter callback (where rejected, expired, dropped messages go) and the
broker-wide sequence counter (a message's original position, for requeues).
Its consumers are anything with the small :class:`Outlet` interface, so the
deliveries above it are not imported here.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final, Protocol

from banyan_bus.errors import TopologyError
from banyan_bus.transport.base import Arguments, Headers, HeaderValue, OutgoingMessage

_OVERFLOWS: Final = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
#: Arguments RabbitMQ has but the emulator does not implement (the bus never declares them).
_NOT_EMULATED: Final = frozenset({"x-max-length-bytes"})


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # close_all_connections() may be called outside the loop
        return None


def now() -> float:
    loop = running_loop()
    return loop.time() if loop is not None else time.monotonic()


def copy_headers(headers: Headers) -> Headers:
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


def _expiry(at: float, queue_ttl_ms: int | None, message_ttl_ms: int | None) -> float | None:
    """Queue TTL and per-message ``expiration``: the earlier wins, as on RabbitMQ."""
    ttls = [t for t in (queue_ttl_ms, message_ttl_ms) if t is not None]
    return at + min(ttls) / 1000 if ttls else None


@dataclass(slots=True, eq=False)
class Message:
    """One message on one queue; ``seq`` is its original position for requeues."""

    properties: OutgoingMessage
    exchange: str
    routing_key: str
    seq: int
    priority: int = 0
    expires_at: float | None = None
    redelivered: bool = False
    returns: int = 0  # quorum queues' delivery count: requeues and connection losses


class Outlet(Protocol):
    """A consumer as its queue sees it: room for one more, take it, go away."""

    def has_capacity(self) -> bool: ...

    def deliver(self, message: Message) -> None: ...

    def detach(self) -> None: ...


#: Where a queue sends what it dead-letters: ``(queue, message, reason)``.
DeadLetter = Callable[["Queue", Message, str], None]


class Queue:
    """A queue: priority lanes of ready messages, its consumers, its TTL timer."""

    def __init__(
        self,
        name: str,
        durable: bool,
        arguments: Arguments,
        *,
        dead_letter: DeadLetter,
        sequence: Iterator[int],
    ) -> None:
        where = f"queue {name!r}"
        self.name = name
        self.durable = durable
        self.arguments: dict[str, HeaderValue] = dict(arguments)
        self._dead_letter = dead_letter
        self._sequence = sequence
        for key in _NOT_EMULATED & arguments.keys():
            raise TopologyError(f"{where}: {key} is not emulated by memory:// (use RabbitMQ)")
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
        self.lanes: list[deque[Message]] = [deque() for _ in range(self.max_priority + 1)]
        self.ready = 0
        self.consumers: list[Outlet] = []
        self.next_consumer = 0
        self.deleted = False
        self._dispatch_loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> dict[str, object]:
        """What a re-declaration must repeat exactly (else ``TopologyMismatch``)."""
        args = {k: v for k, v in self.arguments.items() if (k, v) != ("x-queue-type", "classic")}
        return {"durable": self.durable, **args}

    # -- enqueueing

    def offer(
        self, properties: OutgoingMessage, exchange: str, routing_key: str, force: bool
    ) -> bool:
        """Enqueue a copy; False when ``reject-publish`` overflow refused it.

        ``force`` enqueues even past the limit: an at-least-once dead-lettering,
        which RabbitMQ holds back until the target has room, never drops.
        """
        message = Message(
            properties=replace(properties, headers=copy_headers(properties.headers)),
            exchange=exchange,
            routing_key=routing_key,
            seq=next(self._sequence),
            priority=min(max(properties.priority or 0, 0), self.max_priority),
            expires_at=_expiry(now(), self.ttl_ms, properties.expiration),
        )
        if not force and self.overflow != "drop-head" and self._refuses():
            if self.overflow == "reject-publish-dlx":
                self._dead_letter(self, message, "maxlen")
            return False
        self._add(message, len(self.lanes[message.priority]))
        # drop-head drops what would be delivered next (for priority queues: the
        # oldest message of the highest priority), dead-lettering it as "maxlen".
        while self.overflow == "drop-head" and self._over_limit(0):
            head = self._take_head()
            if head is not None:
                self._dead_letter(self, head, "maxlen")
        self._changed()
        return True

    def requeue(self, message: Message) -> None:
        """Return an unacked message to its original position (ahead of newer ones)."""
        if self.deleted:
            return
        message.redelivered = True
        if self.quorum:
            message.returns += 1
            if self.delivery_limit is not None and message.returns > self.delivery_limit:
                self._dead_letter(self, message, "delivery_limit")
                return
        lane = self.lanes[message.priority]
        index = next((i for i, m in enumerate(lane) if m.seq > message.seq), len(lane))
        self._add(message, index)
        self._changed()

    def reject(self, message: Message) -> None:
        """A client rejected an unacked message: dead-letter it (or drop it)."""
        if not self.deleted:
            self._dead_letter(self, message, "rejected")

    def _refuses(self) -> bool:
        """Whether reject-publish overflow refuses one more message.

        Quorum queues follow RabbitMQ's rabbit_fifo: the limit is checked before
        the enqueue against what is already there (so N+1 fit), and once over it
        the queue refuses until it has drained to its soft limit, 80% of the
        limit rounded down (``is_below_soft_limit``: ready =< trunc(0.8 * N)).
        """
        if not self.quorum:
            return self._over_limit(1)
        if self._overflowing:
            self._overflowing = self._over_limit(0) or (
                self.max_length is not None and self.ready > int(0.8 * self.max_length)
            )
        else:
            self._overflowing = self._over_limit(0)
        return self._overflowing

    def _over_limit(self, extra: int) -> bool:
        return self.max_length is not None and self.ready + extra > self.max_length

    def _add(self, message: Message, index: int) -> None:
        self.lanes[message.priority].insert(index, message)
        self.ready += 1

    def _take_head(self) -> Message | None:
        for lane in reversed(self.lanes):  # highest priority first, FIFO within
            if lane:
                self.ready -= 1
                return lane.popleft()
        return None

    def purge(self) -> int:
        """Drop every ready message (unacked ones stay with their consumers)."""
        count = self.ready
        for lane in self.lanes:
            lane.clear()
        self.ready = 0
        return count

    def _changed(self) -> None:
        self.schedule_expiry()
        self.kick()

    # -- expiry: one timer for the earliest head; a message behind the head never
    #    expires sooner because every message of the queue shares the TTL.

    def schedule_expiry(self) -> None:
        loop = running_loop()
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
        at = now()
        for lane in self.lanes:
            while lane and lane[0].expires_at is not None and lane[0].expires_at <= at:
                message = lane.popleft()
                self.ready -= 1
                self._dead_letter(self, message, "expired")
        self.schedule_expiry()

    # -- dispatch

    def kick(self) -> None:
        """Schedule one drain of ready messages to consumers on the next loop turn."""
        if self.deleted or not self.ready or not self.consumers:
            return
        loop = running_loop()
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

    def take_live(self) -> Message | None:
        """The next message to deliver; ones past their TTL are expired on the way."""
        at = now()
        while (message := self._take_head()) is not None:
            if message.expires_at is None or message.expires_at > at:
                return message
            self._dead_letter(self, message, "expired")
        return None

    def _pick_consumer(self) -> Outlet | None:
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

    def add_consumer(self, consumer: Outlet) -> None:
        self.consumers.append(consumer)
        self.kick()

    def remove_consumer(self, consumer: Outlet) -> None:
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
