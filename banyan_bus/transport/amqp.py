"""The RabbitMQ transport: the seam's operations on aio-pika / aiormq.

One robust connection (aio-pika re-opens it, restores channels, topology and
consumers after a loss). Channels: one with publisher confirms for publishing,
one without for fire-and-forget, one per consumer (each with its own prefetch),
and a topology channel replaced whenever the broker closes it over a refused
declaration (a large batch of declarations borrows a few more: ``amqp_topology``).
Publishing goes straight to aiormq's ``basic_publish`` with prebuilt properties:
on the hot path every microsecond shows.

aio-pika/aiormq errors are translated here and never escape.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pamqp import commands as spec
from yarl import URL

from banyan_bus.deadlines import Deadlines
from banyan_bus.errors import (
    BrokerUnreachable,
    BusCapacityExceeded,
    ConfigurationError,
    PublishError,
    TopologyError,
    Unroutable,
)
from banyan_bus.transport import amqp_frames
from banyan_bus.transport.amqp_connection import (
    FailoverConnection,
    channel_max,
    explain_refusal,
    with_heartbeat,
)
from banyan_bus.transport.amqp_consumer import AmqpConsumer, AmqpDelivery
from banyan_bus.transport.amqp_properties import WireProperties
from banyan_bus.transport.amqp_settle import ChannelSettler
from banyan_bus.transport.amqp_topology import TopologyChannels
from banyan_bus.transport.amqp_topology import reply_text as _reply_text
from banyan_bus.transport.base import (
    Arguments,
    Consumer,
    Delivery,
    DeliveryCallback,
    ExchangeType,
    OutgoingMessage,
    QueueState,
    Transport,
)
from banyan_bus.transport.url import mask_url

REPLY_TO = "amq.rabbitmq.reply-to"

log = structlog.get_logger("banyan_bus.transport.amqp")


class AmqpTransport(Transport):
    """A RabbitMQ connection. ``url`` is an ``amqp://`` or ``amqps://`` URL.

    TLS: an ``amqps://`` URL verifies the broker's certificate against the system's
    CAs by default; ``?cafile=/path/ca.pem`` names another CA, ``?certfile=`` and
    ``?keyfile=`` give a client certificate (mutual TLS), ``?no_verify_ssl=1`` turns
    verification off (tests only). ``ssl_context`` replaces all of these with a
    context built in code. ``?heartbeat=N`` overrides ``amqp_connection.DEFAULT_HEARTBEAT``.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 10.0,
        name: str = "banyan",
        reconnect_interval: float = 1.0,
        publish_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._publish_timeout = publish_timeout
        self._ssl_context = ssl_context
        self._channel_max = channel_max(url)
        # Several comma-separated URLs name the nodes of one cluster.
        given = [u.strip() for u in url.split(",") if u.strip()]
        self._urls = [with_heartbeat(u) for u in given]
        self.display_url = ",".join(mask_url(u) for u in given) or mask_url(url)
        self._display_urls = [mask_url(u) for u in given]
        self._reconnect_interval = reconnect_interval
        self._connect_timeout = connect_timeout
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._confirm_channel: AbstractChannel | None = None
        self._plain_channel: AbstractChannel | None = None
        self._topology_channels = TopologyChannels(self.display_url)
        self._consumers: set[AmqpConsumer] = set()
        self._get_settlers: dict[aiormq.abc.AbstractChannel, ChannelSettler] = {}
        self._background: set[asyncio.Task[None]] = set()
        # The aiormq channel under each aio-pika one, while it is open.
        self._underlays: dict[AbstractChannel, aiormq.abc.AbstractChannel] = {}
        self._publish_deadlines = Deadlines(publish_timeout, "publish")

    # -- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        # A message whose properties pamqp cannot decode must cost that message, not the
        # connection: see amqp_frames.
        amqp_frames.install()
        errors: list[str] = []
        for index, url in enumerate(self._urls):
            connection = FailoverConnection(
                URL(url),
                ssl_context=self._ssl_context,
                client_properties={"connection_name": self._name},
                reconnect_interval=self._reconnect_interval,
            )
            connection.failover_urls(self._urls, start=index)
            try:
                await connection.connect(timeout=self._connect_timeout)
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                errors.append(f"{self._display_urls[index]}: {explain_refusal(exc)}")
                await connection.close()
                continue
            self._connection = connection
            break
        else:
            raise BrokerUnreachable(
                f"cannot connect to RabbitMQ at {'; '.join(errors)}. Is the broker running "
                f"and are the host, port, vhost and credentials right?"
            )
        self._confirm_channel = await self._connection.channel(publisher_confirms=True)
        self._plain_channel = await self._connection.channel(publisher_confirms=False)
        await self._topology_channels.connect(self._connection)

    async def close(self) -> None:
        if self._connection is not None:
            # Settlements are written a loop turn after the handler settled: get them
            # on the wire first, or the broker would redeliver what was handled.
            settlers = [*self._get_settlers.values()]
            drains = [c.drain() for c in self._consumers] + [s.drain() for s in settlers]
            try:
                async with asyncio.timeout(5):
                    await asyncio.gather(*drains, return_exceptions=True)
            except TimeoutError:
                log.warning("settle_drain_timeout", detail="closing with settlements unsent")
            for task in self._background:
                task.cancel()
            self._consumers.clear()
            self._get_settlers.clear()
            connection, self._connection = self._connection, None
            await connection.close()

    def on_connection_lost(self, callback: Callable[[], None]) -> None:
        self._conn().close_callbacks.add(lambda *_: callback())

    @property
    def connected(self) -> bool:
        # aio-pika clears ``connected`` when the connection drops and sets it again
        # once a reconnect attempt got through (before channels are restored: the
        # consumers answer for their own channels in ``consuming``).
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    def consuming(self, queue: str) -> bool:
        return self.connected and any(c.queue == queue and c.active for c in self._consumers)

    def _conn(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError(f"transport to {self.display_url} is not connected")
        return self._connection

    def _topology(
        self, kind: str, name: str, requested: Arguments
    ) -> AbstractAsyncContextManager[Any]:
        """A channel for one declaration; a refusal closes it, so another is opened."""
        return self._topology_channels.use(kind, name, requested)

    def declaring(self, count: int, *, consumers: int = 0) -> AbstractAsyncContextManager[int]:
        # Half the room under channel_max at most (amqp_topology), after the channels of
        # the consumers that start meanwhile: they need it too.
        in_use = len(self._consumers) + len(self._get_settlers) + 3 + consumers
        return self._topology_channels.batch(count, room=self._channel_max - in_use)

    # -- topology -------------------------------------------------------------------

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None:
        args = dict(arguments or {})
        async with self._topology("exchange", name, {"type": type, **args}) as ch:
            await ch.exchange_declare(
                exchange=name, exchange_type=type, durable=durable, arguments=args
            )

    async def declare_queue(
        self, name: str, *, durable: bool = True, arguments: Arguments | None = None
    ) -> None:
        args = dict(arguments or {})
        async with self._topology("queue", name, args) as ch:
            await ch.queue_declare(queue=name, durable=durable, arguments=args)

    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        args = dict(arguments or {})
        async with self._topology("binding", f"{exchange} -> {queue}", args) as ch:
            await ch.queue_bind(
                queue=queue, exchange=exchange, routing_key=routing_key, arguments=args
            )

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        args = dict(arguments or {})
        async with self._topology("binding", f"{source} -> {destination}", args) as ch:
            await ch.exchange_bind(
                destination=destination, source=source, routing_key=routing_key, arguments=args
            )

    async def queue_state(self, queue: str) -> QueueState | None:
        try:
            async with self._topology("queue", queue, {}) as ch:
                ok = await ch.queue_declare(queue=queue, passive=True)
        except TopologyError:
            return None
        return QueueState(
            name=queue, messages=ok.message_count or 0, consumers=ok.consumer_count or 0
        )

    async def exchange_exists(self, name: str) -> bool:
        try:
            async with self._topology("exchange", name, {}) as ch:
                await ch.exchange_declare(exchange=name, passive=True)
        except TopologyError:
            return False
        return True

    async def purge_queue(self, queue: str) -> int:
        async with self._topology("queue", queue, {}) as ch:
            ok = await ch.queue_purge(queue=queue)
        return int(ok.message_count or 0)

    async def delete_queue(self, queue: str) -> None:
        async with self._topology("queue", queue, {}) as ch:
            await ch.queue_delete(queue=queue)

    async def delete_exchange(self, name: str) -> None:
        async with self._topology("exchange", name, {}) as ch:
            await ch.exchange_delete(exchange=name)

    # -- publish --------------------------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: OutgoingMessage,
        *,
        confirm: bool = True,
        mandatory: bool = False,
    ) -> None:
        channel = self._confirm_channel if confirm else self._plain_channel
        if channel is None:
            raise PublishError(f"not connected to {self.display_url}; nothing was sent")
        try:
            # Bounded: a robust channel waits for a reconnect, a blocked connection
            # (memory alarm) for the broker; neither may hang the caller forever.
            result = await self._publish_deadlines.bounded(
                self._basic_publish(channel, message, exchange, routing_key, mandatory, confirm)
            )
        except aiormq.exceptions.DeliveryError as exc:
            raise BusCapacityExceeded(
                f"the broker refused {message.message_type or 'a message'} "
                f"({message.message_id}) published to {exchange!r} with routing key "
                f"{routing_key!r} (nack): a queue it routes to is full (max_length with "
                f"reject-publish) or cannot take it now (a quorum queue without a leader, "
                f"during a node failure or partition). Nothing is confirmed: retry later, "
                f"slow the publisher or drain the queue."
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise PublishError(
                f"cannot publish to {exchange!r}: {_reply_text(exc)}; nothing was sent"
            ) from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise PublishError(
                f"cannot encode {message.message_id} for AMQP (a header value the client "
                f"cannot write?): {type(exc).__name__}: {exc}; nothing was sent"
            ) from exc
        except (
            TimeoutError,
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as exc:
            raise PublishError(
                f"publish of {message.message_id} to {exchange!r} was not confirmed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if mandatory and isinstance(result, aiormq.abc.DeliveredMessage):
            raise Unroutable(
                f"{message.message_type or 'message'} {message.message_id} published to "
                f"{exchange!r} with routing key {routing_key!r} reached no queue"
            )

    async def _basic_publish(
        self,
        channel: AbstractChannel,
        message: OutgoingMessage,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        confirm: bool,
    ) -> aiormq.abc.ConfirmationFrameType | None:
        underlay = self._underlays.get(channel)
        if underlay is None or underlay.is_closed:
            underlay = self._underlays[channel] = await channel.get_underlay_channel()
        properties = WireProperties(message)  # encoded here, in one pass
        # With confirms, waiting for the socket to drain as well only adds a task
        # switch per message: the confirmation comes after the bytes left anyway.
        return await underlay.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=not confirm,  # type: ignore[call-arg]  # aiormq.Channel has it; its ABC lags
        )

    # -- consume --------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        cancel_on_loss: bool = False,
    ) -> Consumer:
        # One channel per consumed queue (each its own prefetch). aiormq numbers channels
        # past the broker's negotiated channel_max, and RabbitMQ answers that by closing the
        # whole connection: every subscription and publish of the process would go with it.
        # Refuse the one subscription instead, while there is still room.
        open_channels = len(self._consumers) + len(self._get_settlers) + 3
        if open_channels >= self._channel_max:
            raise ConfigurationError(
                f"cannot consume {queue!r}: this connection to {self.display_url} already "
                f"carries {open_channels} channels and the broker allows {self._channel_max} "
                f"(RabbitMQ's channel_max, default 2047; one channel per consumed queue). "
                f"Spread the subscriptions over processes (`banyan run --workers N` or more "
                f"services), or raise channel_max on the broker and pass ?channel_max=N."
            )
        channel = await self._conn().channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)  # the robust channel restores it
        consumer = AmqpConsumer(queue, callback, channel, self, cancel_on_loss=cancel_on_loss)
        try:
            await consumer.start()
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            # No passive declare first (a round trip per subscription at start): the
            # broker's 404 closed this channel, which is closed for good here.
            with suppress(aiormq.exceptions.AMQPError, ConnectionError):
                await channel.close()
            raise TopologyError(
                f"cannot consume from {queue!r}: queue {queue!r} does not exist (NOT_FOUND)"
            ) from exc
        self._consumers.add(consumer)
        return consumer

    async def start_replies(self, callback: Callable[[Delivery], None]) -> str:
        # Direct reply-to: consume the pseudo-queue, no-ack, on the channel that
        # publishes the requests (the confirm channel), as RabbitMQ requires.
        channel = self._confirm_channel
        if channel is None:
            raise RuntimeError(f"transport to {self.display_url} is not connected")

        async def on_reply(delivery: Delivery) -> None:
            callback(delivery)

        consumer = AmqpConsumer(
            REPLY_TO, on_reply, cast(AbstractRobustChannel, channel), self, no_ack=True
        )
        await consumer.start()
        self._consumers.add(consumer)
        return REPLY_TO

    async def get(self, queue: str) -> Delivery | None:
        channel = self._plain_channel
        if channel is None:
            raise RuntimeError(f"transport to {self.display_url} is not connected")
        underlay = await channel.get_underlay_channel()
        settler = self._get_settlers.get(underlay)
        if settler is None:
            # A reopened channel is a new one: forget the settlers of closed ones.
            for old in [c for c in self._get_settlers if c.is_closed]:
                del self._get_settlers[old]
            settler = self._get_settlers[underlay] = ChannelSettler(underlay)
        try:
            message = await underlay.basic_get(queue, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyError(f"cannot get from {queue!r}: {_reply_text(exc)}") from exc
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return None
        return AmqpDelivery(message, settler)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
