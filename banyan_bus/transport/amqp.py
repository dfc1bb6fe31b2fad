"""The RabbitMQ transport: the seam's operations on aio-pika / aiormq.

One robust connection (aio-pika re-opens it, restores channels, topology and
consumers after a loss). Channels: one with publisher confirms for publishing,
one without for fire-and-forget, one per consumer (each with its own prefetch),
and a topology channel replaced whenever the broker closes it over a refused
declaration. Publishing goes straight to aiormq's ``basic_publish`` with
prebuilt properties: on the hot path every microsecond shows.

aio-pika/aiormq errors are translated here and never escape.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika import RobustConnection
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from yarl import URL

from banyan_bus.deadlines import Deadlines
from banyan_bus.errors import (
    BrokerUnreachable,
    BusCapacityExceeded,
    ConfigurationError,
    PluginMissing,
    PublishError,
    SettleError,
    TopologyError,
    TopologyMismatch,
    Unroutable,
)
from banyan_bus.transport import amqp_frames
from banyan_bus.transport.amqp_properties import WireProperties
from banyan_bus.transport.amqp_settle import ChannelSettler
from banyan_bus.transport.base import (
    Arguments,
    Consumer,
    Delivery,
    DeliveryCallback,
    ExchangeType,
    Headers,
    OutgoingMessage,
    QueueState,
    Transport,
)
from banyan_bus.transport.url import mask_url

REPLY_TO = "amq.rabbitmq.reply-to"

log = structlog.get_logger("banyan_bus.transport.amqp")

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r".*?received (?P<received>.+?) but current is (?P<current>.+?)(?:'?\)|$)"
)


class AmqpDelivery(Delivery):
    """A delivery read straight from aiormq (no aio-pika message object, no extra task).

    Settling goes through the channel's ``ChannelSettler``: it returns at once,
    and the frame goes out, coalesced with the others of this loop turn, right
    after. Without a settler (direct reply-to, no-ack) the message is settled
    on arrival.
    """

    __slots__ = ("_channel", "_settled", "_settler", "_tag")

    def __init__(self, message: DeliveredMessage, settler: ChannelSettler | None) -> None:
        props = message.header.properties
        frame = message.delivery
        super().__init__(
            body=message.body,
            headers=cast(Headers, props.headers or {}),
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            message_type=props.message_type,
            timestamp=props.timestamp,
            priority=props.priority,
            content_type=props.content_type,
            reply_to=props.reply_to,
            redelivered=bool(getattr(frame, "redelivered", False)),
            exchange=getattr(frame, "exchange", None) or "",
            routing_key=getattr(frame, "routing_key", None) or "",
        )
        self._channel = message.channel
        self._settler = settler
        self._tag: int = getattr(frame, "delivery_tag", None) or 0
        self._settled = settler is None
        if settler is not None:
            settler.delivered(self._tag)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def stale(self) -> bool:
        return bool(self._channel.is_closed)

    def _settle(self, action: str) -> ChannelSettler:
        if self._settled:
            raise RuntimeError(f"cannot {action} message {self.message_id!r}: already settled")
        self._settled = True
        settler = self._settler
        assert settler is not None  # a delivery without one is settled from the start
        if settler.closed:
            # The broker has already returned the message to its queue and will
            # redeliver it. Nothing is lost, so this is not fatal.
            raise SettleError(
                f"cannot {action} message {self.message_id!r}: its channel is closed "
                f"(the message will be redelivered)"
            )
        return settler

    async def ack(self) -> None:
        self._settle("ack").ack(self._tag)

    async def nack(self, *, requeue: bool = True) -> None:
        self._settle("nack").nack(self._tag, requeue=requeue)

    async def reject(self) -> None:
        self._settle("reject").reject(self._tag)


class _AmqpConsumer(Consumer):
    """One basic.consume, on a robust channel of its own, renewed whenever it reopens.

    Deliveries go from aiormq's per-delivery task straight to the callback
    (aio-pika's consumer wrapper would build a message object and start a
    second task per delivery). With ``no_ack`` (direct reply-to) the broker
    settles on arrival, so deliveries get no settler.
    """

    def __init__(
        self,
        queue: str,
        callback: DeliveryCallback,
        channel: AbstractRobustChannel,
        transport: AmqpTransport,
        *,
        no_ack: bool = False,
    ) -> None:
        self._queue = queue
        self._no_ack = no_ack
        self._callback = callback
        self._channel = channel
        self._transport = transport
        self._tag = f"banyan.{queue}.{os.urandom(8).hex()}"
        self._cancelled = False
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._settler: ChannelSettler | None = None
        self._taking = False  # basic.consume answered, and the broker has not cancelled it

    async def start(self) -> None:
        await self._consume()
        self._channel.reopen_callbacks.add(self._reopened)

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        settler = None if self._no_ack else ChannelSettler(underlay)
        callback = self._callback

        async def on_message(message: DeliveredMessage) -> None:
            await callback(AmqpDelivery(message, settler))

        underlay.on_consumer_cancel_callbacks.add(self._broker_cancelled)
        self._underlay, self._settler = underlay, settler
        await underlay.basic_consume(
            self._queue, on_message, consumer_tag=self._tag, no_ack=self._no_ack
        )
        self._taking = True

    @property
    def queue(self) -> str:
        return self._queue

    @property
    def active(self) -> bool:
        """Taking deliveries now: not cancelled (by us or the broker), its channel open."""
        underlay = self._underlay
        return (
            self._taking and not self._cancelled and underlay is not None and not underlay.is_closed
        )

    async def _reopened(self, *_: Any) -> None:
        if not self._cancelled:
            await self._consume()

    def _broker_cancelled(self, frame: spec.Basic.Cancel) -> None:
        """The broker ended our consumer (its queue was deleted, or it moved): start again
        once the queue is there, as aio-pika's robust queues do."""
        if frame.consumer_tag != self._tag or self._cancelled:
            return
        self._taking = False
        log.warning("consumer_cancelled_by_broker", queue=self._queue)
        self._transport._spawn(self._resume())

    async def _resume(self) -> None:
        while not self._cancelled and self._transport._connection is not None:
            await asyncio.sleep(self._transport._reconnect_interval)
            if self._cancelled or await self._transport.queue_state(self._queue) is None:
                continue
            try:
                await self._consume()
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError):
                continue
            return

    async def drain(self) -> None:
        if self._settler is not None:
            await self._settler.drain()

    async def cancel(self) -> None:
        self._cancelled = True
        self._channel.reopen_callbacks.discard(self._reopened)
        underlay = self._underlay
        if self._transport._connection is None or underlay is None or underlay.is_closed:
            return  # the connection is gone: the broker has cancelled it already
        try:
            async with asyncio.timeout(10):
                await underlay.basic_cancel(self._tag)
        except (
            TimeoutError,
            aiormq.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
        ):
            pass


class _FailoverConnection(RobustConnection):
    """aio-pika's robust connection, reconnecting to the next node of a cluster.

    aio-pika reconnects to the URL it was given; with a node down for good that
    never succeeds. ``Connection.connect`` reads ``self.url`` once per attempt, so
    while disconnected each attempt after a failed one moves on to the next URL.
    """

    def failover_urls(self, urls: list[str], *, start: int) -> None:
        self._banyan_urls = [URL(u) for u in urls]
        self._banyan_index = start
        self._banyan_rotated = time.monotonic()

    @property
    def url(self) -> URL:
        urls: list[URL] | None = self.__dict__.get("_banyan_urls")
        if not urls:
            return cast(URL, self.__dict__["_banyan_url"])
        connected = self.__dict__.get("connected")
        now = time.monotonic()
        if (
            len(urls) > 1
            and connected is not None
            and not connected.is_set()
            and now - self._banyan_rotated >= 0.8 * self.reconnect_interval
        ):
            self._banyan_index = (self._banyan_index + 1) % len(urls)
            self._banyan_rotated = now
        return urls[self._banyan_index]

    @url.setter
    def url(self, value: URL) -> None:
        self.__dict__["_banyan_url"] = value


DEFAULT_HEARTBEAT = 8
"""Seconds between AMQP heartbeats unless the URL says ``?heartbeat=N``.

Why 8 and not the broker's 60: a half-open connection (a partition, a peer that
vanished without a FIN or RST) is noticed only by missing heartbeats. aiormq
gives up after three missed intervals plus one, checked every half interval:
(8 + 1) x 3 = 27 s, noticed within about 31 s, against about 3 minutes at 60 s.
Until then publishes without confirmation "succeed" into a dead socket
(fire-and-forget is at-most-once during a partition) and consumers wait. A
lower value notices sooner but drops a connection whose event loop is blocked
that long (CPU-bound code in a handler).
"""


def _with_heartbeat(url: str) -> str:
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=DEFAULT_HEARTBEAT))


DEFAULT_CHANNEL_MAX = 2047
"""RabbitMQ's default ``channel_max``; a URL's ``?channel_max=N`` says the broker's own."""


def _channel_max(url: str) -> int:
    value = URL(url.split(",")[0].strip()).query.get("channel_max", str(DEFAULT_CHANNEL_MAX))
    if not value.isdigit() or not 4 <= int(value) <= 65535:
        raise ConfigurationError(
            f"channel_max in the AMQP URL must be a whole number in 4..65535, got {value!r}"
        )
    return int(value)


def _explain_refusal(exc: BaseException) -> str:
    """The broker's own reason for refusing the handshake, where aiormq hides it.

    A wrong vhost is refused with ``Connection.Close`` in answer to
    ``Connection.Open``; aiormq reports that as ``InvalidFrameError: Expected one
    of ['Connection.OpenOk'], got <Connection.Close object ...>``, which names
    neither the vhost nor the reason. The Close frame's repr (made readable in
    :func:`_readable_close_frames`) carries ``NOT_ALLOWED - vhost ... not found``.
    """
    text = str(exc)
    match = re.search(r"Connection\.Close\((?P<code>\d+), (?P<text>.*)\)>?$", text)
    if match:
        return f"the broker refused: {match['text']} (reply code {match['code']})"
    return f"{type(exc).__name__}: {text or 'no answer'}"


def _readable_close_frames() -> None:
    # pamqp's frames use object.__repr__; give the two Close frames their code and text
    # so a refusal that aiormq reports only by repr still says why (see _explain_refusal).
    def _repr(frame: spec.Connection.Close | spec.Channel.Close) -> str:
        return f"<{frame.name}({frame.reply_code}, {frame.reply_text})>"

    spec.Connection.Close.__repr__ = _repr  # type: ignore[assignment,method-assign]
    spec.Channel.Close.__repr__ = _repr  # type: ignore[assignment,method-assign]


_readable_close_frames()


class AmqpTransport(Transport):
    """A RabbitMQ connection. ``url`` is an ``amqp://`` or ``amqps://`` URL.

    TLS: an ``amqps://`` URL verifies the broker's certificate against the system's
    CAs by default; ``?cafile=/path/ca.pem`` names another CA, ``?certfile=`` and
    ``?keyfile=`` give a client certificate (mutual TLS), ``?no_verify_ssl=1`` turns
    verification off (tests only). ``ssl_context`` replaces all of these with a
    context built in code. ``?heartbeat=N`` overrides :data:`DEFAULT_HEARTBEAT`.
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
        self._channel_max = _channel_max(url)
        # Several comma-separated URLs name the nodes of one cluster.
        given = [u.strip() for u in url.split(",") if u.strip()]
        self._urls = [_with_heartbeat(u) for u in given]
        self._url = self._urls[0] if self._urls else url
        self.display_url = ",".join(mask_url(u) for u in given) or mask_url(url)
        self._display_urls = [mask_url(u) for u in given]
        self._reconnect_interval = reconnect_interval
        self._connect_timeout = connect_timeout
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._confirm_channel: AbstractChannel | None = None
        self._plain_channel: AbstractChannel | None = None
        self._topology_channel: AbstractChannel | None = None
        self._topology_lock = asyncio.Lock()
        self._consumers: set[_AmqpConsumer] = set()
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
            connection = _FailoverConnection(
                URL(url),
                ssl_context=self._ssl_context,
                client_properties={"connection_name": self._name},
                reconnect_interval=self._reconnect_interval,
            )
            connection.failover_urls(self._urls, start=index)
            try:
                await connection.connect(timeout=self._connect_timeout)
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                errors.append(f"{self._display_urls[index]}: {_explain_refusal(exc)}")
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
        self._topology_channel = await self._connection.channel(publisher_confirms=False)

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

    @asynccontextmanager
    async def _topology(self, kind: str, name: str, requested: Arguments) -> AsyncIterator[Any]:
        """Run one declaration; a refusal closes the channel, so we open a new one."""
        async with self._topology_lock:
            channel = self._topology_channel
            if channel is None or channel.is_closed:
                channel = self._topology_channel = await self._conn().channel(
                    publisher_confirms=False
                )
            try:
                yield await channel.get_underlay_channel()
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                self._topology_channel = None
                raise _mismatch(kind, name, requested, exc) from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                self._topology_channel = None
                raise TopologyError(f"{kind} {name!r}: {_reply_text(exc)}") from exc
            except aiormq.exceptions.ConnectionCommandInvalid as exc:
                self._topology_channel = None
                text = _reply_text(exc)
                if "x-consistent-hash" in text or "unknown exchange type" in text:
                    raise PluginMissing(
                        f"the broker at {self.display_url} cannot declare {kind} {name!r}: "
                        f"{text}. Enable the plugin: "
                        f"`rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`."
                    ) from exc
                raise TopologyError(f"{kind} {name!r}: {text}") from exc
            except aiormq.exceptions.AMQPError as exc:
                self._topology_channel = None
                raise TopologyError(f"{kind} {name!r}: {_reply_text(exc)}") from exc

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
                f"{routing_key!r}: a queue it routes to is full (max_length with "
                f"reject-publish). Slow the publisher or drain the queue."
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

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
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
        if not await self.queue_state(queue):
            await channel.close()
            raise TopologyError(f"cannot consume {queue!r}: the queue does not exist")
        consumer = _AmqpConsumer(queue, callback, channel, self)
        await consumer.start()
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

        consumer = _AmqpConsumer(
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


def _reply_text(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    for arg in args:
        text = getattr(arg, "reply_text", None)
        if text:
            return str(text)
    return str(exc)


def _mismatch(kind: str, name: str, requested: Arguments, exc: BaseException) -> TopologyError:
    text = _reply_text(exc)
    match = _INEQUIVALENT.search(text)
    existing: dict[str, object] | None = None
    if match:
        existing = {match["arg"]: match["current"].strip("'")}
    return TopologyMismatch(kind, name, existing, dict(requested), detail=f"Broker said: {text}")
