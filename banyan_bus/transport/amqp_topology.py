"""The channels the RabbitMQ transport declares topology on, and its refusals in our words.

One declaration is one round trip, and a channel carries one at a time (aiormq
waits for each answer before it sends the next request on that channel; the
broker handles a channel's methods in order anyway). A service with a thousand
subscriptions declares some seven thousand exchanges, queues and bindings at
start, so one channel would mean seven thousand round trips in a row, each
waiting for the broker (a quorum queue takes milliseconds to start).

So a *batch* (``declarations.apply`` of a whole plan) borrows a few channels of
its own for its duration and keeps one declaration in flight on each: the
broker works on them side by side. The batch opens them lazily, never more than
:data:`BATCH_CHANNELS` nor half the room left under ``channel_max`` (consumers
need channels too), and closes them when it ends. Outside a batch, and for small
batches, declarations take the one topology channel in turn, as before.

Every declaration still waits for its own answer, so a refusal is still that
declaration's: a ``PRECONDITION_FAILED`` names the queue and both argument sets
(``TopologyMismatch``). ``nowait`` declarations would save the round trip but not
the broker's work, and would leave a refusal to be matched to its declaration
afterwards; measured here they gained nothing over a few channels.

A refused declaration closes its channel (that is AMQP): the topology channel is
replaced on next use, a batch channel is dropped and another opened if needed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from banyan_bus.errors import PluginMissing, TopologyError, TopologyMismatch
from banyan_bus.transport.base import Arguments

#: At most this many channels declare a batch side by side. The broker runs them on its
#: schedulers (two cores here: 4 already does most of it, 8 a little more, 16 no more).
BATCH_CHANNELS = 8
#: A batch gets one more channel per this many declarations (a channel costs two round
#: trips to open and close: not worth it for a handful).
DECLARATIONS_PER_CHANNEL = 16

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r".*?received (?P<received>.+?) but current is (?P<current>.+?)(?:'?\)|$)"
)


def reply_text(exc: BaseException) -> str:
    """The broker's own words in an aiormq exception (its ``reply_text``), else the text."""
    for arg in getattr(exc, "args", ()):
        text = getattr(arg, "reply_text", None)
        if text:
            return str(text)
    return str(exc)


def mismatch(kind: str, name: str, requested: Arguments, exc: BaseException) -> TopologyError:
    """A ``PRECONDITION_FAILED`` as a ``TopologyMismatch`` naming both argument sets."""
    text = reply_text(exc)
    match = _INEQUIVALENT.search(text)
    existing: dict[str, object] | None = None
    if match:
        existing = {match["arg"]: match["current"].strip("'")}
    return TopologyMismatch(kind, name, existing, dict(requested), detail=f"Broker said: {text}")


def refusal(
    kind: str, name: str, requested: Arguments, exc: aiormq.exceptions.AMQPError, display_url: str
) -> TopologyError:
    """The ``banyan_bus.errors`` exception for a refused declaration of ``kind`` ``name``."""
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return mismatch(kind, name, requested, exc)
    text = reply_text(exc)
    if isinstance(exc, aiormq.exceptions.ConnectionCommandInvalid) and (
        "x-consistent-hash" in text or "unknown exchange type" in text
    ):
        return PluginMissing(
            f"the broker at {display_url} cannot declare {kind} {name!r}: {text}. Enable the "
            f"plugin: `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`."
        )
    return TopologyError(f"{kind} {name!r}: {text}")


class TopologyChannels:
    """The topology channel, and the channels a batch of declarations borrows."""

    def __init__(self, display_url: str) -> None:
        self._display_url = display_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        # While a batch runs: its channels, each taken by one declaration at a time
        # (None: not opened yet, or dropped after a refusal).
        self._pool: asyncio.Queue[aiormq.abc.AbstractChannel | None] | None = None
        self._opened: list[aiormq.abc.AbstractChannel] = []
        self._batches = 0
        self._width = 1

    async def connect(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel = await connection.channel(publisher_confirms=False)

    def _conn(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError(f"transport to {self._display_url} is not connected")
        return self._connection

    @asynccontextmanager
    async def use(self, kind: str, name: str, requested: Arguments) -> AsyncIterator[Any]:
        """A channel for one declaration of ``kind`` ``name``; refusals in our words."""
        if self._pool is not None:
            async with self._pooled(kind, name, requested) as channel:
                yield channel
            return
        async with self._lock:
            channel = self._channel
            if channel is None or channel.is_closed:
                channel = self._channel = await self._conn().channel(publisher_confirms=False)
            try:
                yield await channel.get_underlay_channel()
            except aiormq.exceptions.AMQPError as exc:
                self._channel = None
                raise refusal(kind, name, requested, exc, self._display_url) from exc

    @asynccontextmanager
    async def _pooled(self, kind: str, name: str, requested: Arguments) -> AsyncIterator[Any]:
        pool = self._pool
        assert pool is not None
        channel = await pool.get()
        answered = False
        try:
            if channel is None or channel.is_closed:
                channel = await self._open()
            yield channel
            answered = True
        except aiormq.exceptions.AMQPError as exc:
            raise refusal(kind, name, requested, exc, self._display_url) from exc
        finally:
            # A refusal closed the channel (a cancelled request may have left it
            # waiting for an answer): the next declaration opens another.
            pool.put_nowait(channel if answered else None)

    async def _open(self) -> aiormq.abc.AbstractChannel:
        # A plain aiormq channel, not a robust one: it lives for one batch, and a robust
        # channel reopens itself after a refusal and after a reconnect.
        transport = self._conn().transport
        if transport is None:
            raise TopologyError(f"the connection to {self._display_url} is not open")
        channel = await transport.connection.channel(publisher_confirms=False)
        self._opened.append(channel)
        return channel

    @asynccontextmanager
    async def batch(self, count: int, room: int) -> AsyncIterator[int]:
        """``count`` declarations follow: how many may be in flight at once.

        ``room`` is how many more channels the connection may open (its ``channel_max``
        less those open); the batch takes half of it at most.
        """
        width = min(BATCH_CHANNELS, count // DECLARATIONS_PER_CHANNEL, room // 2)
        connection = self._connection
        if self._pool is None and (
            width < 2 or connection is None or not connection.connected.is_set()
        ):
            yield 1  # one at a time, on the topology channel
            return
        if self._pool is None:
            self._pool = asyncio.Queue()
            for _ in range(width):
                self._pool.put_nowait(None)
            self._width = width
        self._batches += 1  # a batch begun meanwhile (the delay levels) shares the channels
        try:
            yield self._width
        finally:
            self._batches -= 1
            if not self._batches:
                pool, self._pool = self._pool, None  # from now on: the topology channel
                assert pool is not None
                for _ in range(self._width):  # wait for declarations still on its channels
                    await pool.get()
                opened, self._opened = self._opened, []
                await asyncio.gather(*(_close(c) for c in opened))


async def _close(channel: aiormq.abc.AbstractChannel) -> None:
    if channel.is_closed:
        return
    with suppress(aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError):
        await channel.close()
