"""What the RabbitMQ transport delivers: deliveries read straight from aiormq, and the consumer.

The consume hot path, apart from the transport's set-up and topology: a
delivery is built from aiormq's message without an aio-pika message object and
settled through its channel's ``ChannelSettler`` (coalesced per loop turn);
the consumer is one ``basic.consume`` on a robust channel of its own, renewed
when the channel reopens or the broker cancels it. A consumer belongs to its
transport and reads the transport's connection state directly.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from banyan_bus.errors import SettleError
from banyan_bus.transport.amqp_settle import ChannelSettler
from banyan_bus.transport.base import Consumer, Delivery, DeliveryCallback, Headers

if TYPE_CHECKING:
    from banyan_bus.transport.amqp import AmqpTransport

log = structlog.get_logger("banyan_bus.transport.amqp")


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


class AmqpConsumer(Consumer):
    """One basic.consume, on a robust channel of its own, renewed whenever it reopens.

    By default each delivery runs in a task of its own, started straight from the
    channel's frame reader (:func:`deliver_directly`; where aiormq does not allow that,
    from aiormq's per-delivery task). Not in aiormq's task itself: aiormq cancels its tasks when the
    connection closes, and a handler cancelled after its side effect but before its
    idempotency key was recorded as done would release the key and run again on the
    redelivery (a double side effect under ``idempotent=True``). A handler outlives
    a lost connection instead: it finishes, records its key, its settle fails
    harmlessly, and the broker's redelivery finds the key done. With
    ``cancel_on_loss`` the callback runs in aiormq's task, cancelled with the
    connection at once: an ordered stream needs that, since another instance takes
    over its keys. Either way tasks start in delivery order. With ``no_ack``
    (direct reply-to) the broker settles on arrival, so deliveries get no settler.
    """

    def __init__(
        self,
        queue: str,
        callback: DeliveryCallback,
        channel: AbstractRobustChannel,
        transport: AmqpTransport,
        *,
        no_ack: bool = False,
        cancel_on_loss: bool = False,
    ) -> None:
        self._queue = queue
        self._no_ack = no_ack
        self._cancel_on_loss = cancel_on_loss
        self._callback = callback
        self._channel = channel
        self._transport = transport
        self._tag = f"banyan.{queue}.{os.urandom(8).hex()}"
        self._cancelled = False
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._settler: ChannelSettler | None = None
        self._taking = False  # basic.consume answered, and the broker has not cancelled it
        self._running: set[asyncio.Future[None]] = set()  # strong references until done

    async def start(self) -> None:
        await self._consume()
        self._channel.reopen_callbacks.add(self._reopened)

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        settler = None if self._no_ack else ChannelSettler(underlay)
        callback = self._callback
        running = self._running

        def start_task(message: DeliveredMessage) -> None:
            task = asyncio.ensure_future(callback(AmqpDelivery(message, settler)))
            running.add(task)
            task.add_done_callback(running.discard)

        async def on_message(message: DeliveredMessage) -> None:
            start_task(message)

        async def on_message_cancelled_on_loss(message: DeliveredMessage) -> None:
            await callback(AmqpDelivery(message, settler))

        if not self._cancel_on_loss:
            deliver_directly(underlay, self._tag, start_task)
        underlay.on_consumer_cancel_callbacks.add(self._broker_cancelled)
        self._underlay, self._settler = underlay, settler
        await underlay.basic_consume(
            self._queue,
            on_message_cancelled_on_loss if self._cancel_on_loss else on_message,
            consumer_tag=self._tag,
            no_ack=self._no_ack,
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


_DIRECT = "_banyan_direct_deliveries"


def deliver_directly(
    underlay: aiormq.abc.AbstractChannel,
    tag: str,
    dispatch: Callable[[DeliveredMessage], None],
) -> bool:
    """Have ``underlay`` hand the deliveries of consumer ``tag`` to ``dispatch`` from its
    frame reader, instead of starting a task of aiormq's own for each.

    aiormq runs every consumer callback in a task it creates per delivery (and cancels
    when the connection closes); a consumer that starts a task of its own anyway (to
    outlive the connection: see :class:`AmqpConsumer`) paid for two tasks per message,
    about 8 µs here. ``dispatch`` is called in delivery order and must not block.

    This reaches into aiormq's channel (its per-frame ``_on_deliver_frame`` and the two
    steps that read a message's header and body). When those are not there (another
    aiormq), nothing changes and False is returned: the consumer callback registered with
    ``basic_consume`` still gets every delivery. Deliveries of other consumer tags, and of
    a tag aiormq no longer consumes (cancelled), take aiormq's own path.
    """
    channel = cast(Any, underlay)
    table: dict[str, Callable[[DeliveredMessage], None]] | None = vars(channel).get(_DIRECT)
    if table is None:
        read_header = getattr(channel, "_Channel__get_content_header", None)
        read_content = getattr(channel, "_read_content", None)
        original = getattr(channel, "_on_deliver_frame", None)
        consumers = getattr(channel, "consumers", None)
        if not (
            callable(read_header)
            and callable(read_content)
            and callable(original)
            and isinstance(consumers, dict)
        ):
            return False
        table = {}
        direct = table

        async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
            target = direct.get(frame.consumer_tag or "")
            if target is None or frame.consumer_tag not in consumers:
                await original(frame)
                return
            header = await read_header()
            message = await read_content(frame, header)
            try:
                target(message)
            except Exception:  # as aiormq's own path: logged, the reader goes on
                log.exception("delivery_dispatch_failed", consumer_tag=frame.consumer_tag)

        vars(channel)[_DIRECT] = table
        channel._on_deliver_frame = on_deliver_frame
    table[tag] = dispatch
    return True
