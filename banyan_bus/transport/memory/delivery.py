"""Deliveries, consumers and connections: a memory queue's messages in a client's hands.

A delivery settles like an AMQP delivery tag: once. Until then it is
*unacked*, held by the connection it went out on (and counted against its
consumer's prefetch). When that connection closes, RabbitMQ returns every
unacked message to its queue for someone else, so the delivery is *stale*:
settling it can no longer reach the broker and raises :class:`SettleError`,
the same error the AMQP transport raises over a closed channel. Nothing is
lost in that case, which is why callers log it and move on.

Handlers run in a task of their own per delivery, as with aio-pika, so a
publish never runs a consumer inline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from banyan_bus.errors import SettleError
from banyan_bus.transport.base import Consumer, Delivery, DeliveryCallback, OutgoingMessage
from banyan_bus.transport.memory.queue import Message, Queue, copy_headers

log = logging.getLogger("banyan_bus.transport.memory")

#: Handler tasks of every memory consumer: referenced here so that none is collected mid-run.
_running: set[asyncio.Task[None]] = set()


class MemoryDelivery(Delivery):
    """A message from a memory queue (or a direct reply, which is settled on arrival)."""

    __slots__ = ("_connection", "_consumer", "_message", "_queue", "_settled")

    def __init__(
        self,
        message: Message,
        queue: Queue | None = None,
        connection: Connection | None = None,
        consumer: MemoryConsumer | None = None,
    ) -> None:
        props = message.properties
        headers = copy_headers(props.headers)
        if queue is not None and queue.quorum and message.returns:
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
        self._settled = queue is None

    @classmethod
    def reply(cls, properties: OutgoingMessage, exchange: str, routing_key: str) -> MemoryDelivery:
        """A direct reply-to delivery: no queue, settled on arrival (RabbitMQ's no-ack)."""
        return cls(Message(properties, exchange, routing_key, seq=-1))

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def stale(self) -> bool:
        return self._connection is not None and self._connection.closed

    def _settle(self, action: str) -> Queue:
        if self._settled:
            raise RuntimeError(f"cannot {action} message {self.message_id!r}: already settled")
        self._settled = True
        connection, queue = self._connection, self._queue
        if connection is None or queue is None:  # a reply, settled from the start
            raise RuntimeError(f"cannot {action} message {self.message_id!r}: already settled")
        if connection.closed:
            raise SettleError(
                f"cannot {action} message {self.message_id!r}: its connection is closed "
                f"(the message will be redelivered)"
            )
        del connection.unacked[self]
        if self._consumer is not None:
            self._consumer.unacked -= 1
        return queue

    def return_to_queue(self) -> None:
        """The connection closed under this delivery: the broker requeues it."""
        if not self._settled and self._queue is not None:
            self._queue.requeue(self._message)

    async def ack(self) -> None:
        self._settle("ack").kick()

    async def nack(self, *, requeue: bool = True) -> None:
        queue = self._settle("nack")
        if requeue:
            queue.requeue(self._message)
        else:
            queue.reject(self._message)
        queue.kick()

    async def reject(self) -> None:
        queue = self._settle("reject")
        queue.reject(self._message)
        queue.kick()


class MemoryConsumer(Consumer):
    """One basic.consume: takes messages while it has prefetch room, one task each."""

    def __init__(
        self,
        connection: Connection,
        queue: Queue,
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

    def deliver(self, message: Message) -> None:
        delivery = MemoryDelivery(message, self.queue, self.connection, self)
        self.unacked += 1
        self.connection.unacked[delivery] = None
        task = asyncio.get_running_loop().create_task(_run_callback(self.callback, delivery))
        _running.add(task)
        task.add_done_callback(_running.discard)

    async def cancel(self) -> None:
        """basic.cancel: no new deliveries; unsettled ones stay with this consumer."""
        self.detach()

    def detach(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.connection.consumers.discard(self)
        self.queue.remove_consumer(self)


async def _run_callback(callback: DeliveryCallback, delivery: MemoryDelivery) -> None:
    try:
        await callback(delivery)
    except Exception:  # the delivery stays unacked, as with aio-pika
        log.exception("consumer callback raised for message %r", delivery.message_id)


class Connection:
    """One ``connect()`` of a transport: what the broker takes back when it closes.

    ``on_close`` is the broker's: it forgets the connection and its reply addresses.
    """

    def __init__(self, on_close: Callable[[Connection], None]) -> None:
        self.closed = False
        self.unacked: dict[MemoryDelivery, None] = {}  # insertion order = delivery order
        self.consumers: set[MemoryConsumer] = set()
        self.reply_addresses: list[str] = []
        self.lost_callbacks: list[Callable[[], None]] = []
        self._on_close = on_close

    def close(self) -> None:
        """Consumers stop, unacked deliveries go back to their queues, callbacks learn of it."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        for consumer in list(self.consumers):
            consumer.detach()
        returned, self.unacked = list(self.unacked), {}
        for delivery in returned:
            delivery.return_to_queue()
        for callback in self.lost_callbacks:
            callback()
