"""The ``Transport`` seam on a memory broker: what ``MessageBus(url="memory://...")`` talks to.

This adapter is thin on purpose. It holds one *connection* to a shared
:class:`~banyan_bus.transport.memory.broker.MemoryBroker` and turns each seam
call into the broker operation, raising the same ``banyan_bus.errors`` the AMQP
transport raises for the same outcome. The tests in ``tests/transport`` hold
both transports to that, call by call, against a real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from banyan_bus.errors import BusCapacityExceeded, PublishError, Unroutable
from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Arguments,
    Consumer,
    Delivery,
    DeliveryCallback,
    ExchangeType,
    OutgoingMessage,
    QueueState,
    Transport,
)
from banyan_bus.transport.memory.broker import SCHEME, broker_name, get_broker
from banyan_bus.transport.memory.delivery import Connection, MemoryConsumer, MemoryDelivery
from banyan_bus.transport.memory.exchange import Binding
from banyan_bus.transport.url import mask_url


class MemoryTransport(Transport):
    """The seam on a :class:`MemoryBroker`; ``connect`` opens a "connection" to it."""

    def __init__(self, url: str = SCHEME) -> None:
        broker_name(url)  # validate early
        self.url = url
        self.display_url = mask_url(url)
        self.broker = get_broker(url)
        self._connection: Connection | None = None

    def _open(self) -> Connection:
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

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    def consuming(self, queue: str) -> bool:
        connection = self._connection
        if connection is None or connection.closed:
            return False
        return any(c.queue.name == queue and not c.cancelled for c in connection.consumers)

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None:
        self._open()
        self.broker.declare_exchange(name, type, durable, arguments or {})

    async def declare_queue(
        self, name: str, *, durable: bool = True, arguments: Arguments | None = None
    ) -> None:
        self._open()
        self.broker.declare_queue(name, durable, arguments or {})

    async def bind_queue(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments | None = None
    ) -> None:
        self._open()
        self.broker.bind(exchange, Binding(queue, False, routing_key, dict(arguments or {})))

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        self._open()
        self.broker.bind(source, Binding(destination, True, routing_key, dict(arguments or {})))

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
        broker = self.broker
        if exchange == DEFAULT_EXCHANGE and routing_key in broker.reply_routes:
            reply = broker.reply_routes[routing_key]
            delivery = MemoryDelivery.reply(message, exchange, routing_key)
            asyncio.get_running_loop().call_soon(reply, delivery)
            return
        source = broker.exchanges.get(exchange)
        if source is None:
            raise PublishError(
                f"cannot publish to exchange {exchange!r} on {self.display_url}: it does not "
                f"exist (NOT_FOUND); nothing was sent"
            )
        if broker.recording:
            broker.journal.append((exchange, routing_key, message))
        queues = broker.route(source, routing_key, message.headers)
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

    async def consume(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        cancel_on_loss: bool = False,  # an in-process broker's connection is never lost
    ) -> Consumer:
        connection = self._open()
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (0 = unlimited), got {prefetch}")
        target = self.broker.queue(queue, f"consume from {queue!r}")
        consumer = MemoryConsumer(connection, target, callback, prefetch)
        connection.consumers.add(consumer)
        target.add_consumer(consumer)
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
        delivery = MemoryDelivery(message, target, connection)
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
        # RabbitMQ refuses a (passive) declare of the default exchange: no answer is "no".
        return name != DEFAULT_EXCHANGE and name in self.broker.exchanges

    async def purge_queue(self, queue: str) -> int:
        self._open()
        return self.broker.queue(queue, f"purge {queue!r}").purge()

    async def delete_queue(self, queue: str) -> None:
        self._open()
        self.broker.delete_queue(queue)

    async def delete_exchange(self, name: str) -> None:
        self._open()
        self.broker.delete_exchange(name)
