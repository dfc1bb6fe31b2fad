"""Acks, nacks and rejects of one AMQP channel, coalesced per event-loop turn.

aio-pika sends every ack as its own frame and waits for the socket to drain
it: per message a future, a trip through aiormq's bounded write queue (ten
frames), a ``send`` system call, and two task switches. The handlers of a busy
consumer finish many messages in the same loop turn, so this module collects
what they settle and writes it once per turn, in one ``ChannelFrame``:

* nacks and rejects first, each for its own delivery tag, in call order;
* then one ``basic.ack`` with ``multiple=True`` for the highest tag acked in
  this turn below which every delivery is settled (RabbitMQ requires that tag
  itself to be unacknowledged, so it is always one acked in this turn);
* then single acks for the rest, which a slower delivery still holds back.

So a slow handler never holds other deliveries' acks (nor the prefetch
window) back, a nack is on the wire before any multiple ack that passes its
tag, and the broker gets one frame for a batch instead of one per message.
Settling returns at once; ``drain`` waits until everything settled so far is
written, which closing the transport does, so handled messages are not
redelivered after a clean shutdown.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import structlog
from aiormq.abc import AbstractChannel, ChannelFrame
from pamqp import commands as spec

log = structlog.get_logger("banyan_bus.transport.amqp")


class ChannelSettler:
    """Settles the deliveries of one aiormq channel (one per channel, not shared)."""

    __slots__ = (
        "_acks",
        "_backlog",
        "_channel",
        "_done",
        "_loop",
        "_open",
        "_others",
        "_scheduled",
        "_sender",
    )

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._loop = asyncio.get_running_loop()
        self._open: deque[int] = deque()  # delivered tags, oldest first, until settled in order
        self._done: set[int] = set()  # settled tags still in _open behind an unsettled one
        self._acks: list[int] = []  # acked since the last flush
        self._others: list[spec.Basic.Nack | spec.Basic.Reject] = []
        self._scheduled = False
        self._backlog: deque[ChannelFrame] = deque()  # waiting for room in the write queue
        self._sender: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return bool(self._channel.is_closed)

    def delivered(self, tag: int) -> None:
        self._open.append(tag)

    def ack(self, tag: int) -> None:
        self._acks.append(tag)
        self._schedule()

    def nack(self, tag: int, *, requeue: bool) -> None:
        self._done.add(tag)
        self._others.append(spec.Basic.Nack(delivery_tag=tag, requeue=requeue))
        self._schedule()

    def reject(self, tag: int) -> None:
        self._done.add(tag)
        self._others.append(spec.Basic.Reject(delivery_tag=tag, requeue=False))
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _frames(self) -> list[Any]:
        frames: list[Any] = list(self._others)
        self._others.clear()
        acks, self._acks = self._acks, []
        done, open_ = self._done, self._open
        done.update(acks)
        watermark = 0  # every tag up to here is settled
        while open_ and open_[0] in done:
            watermark = open_.popleft()
            done.discard(watermark)
        covered = max((t for t in acks if t <= watermark), default=0)
        if covered:
            frames.append(spec.Basic.Ack(delivery_tag=covered, multiple=True))
        frames.extend(spec.Basic.Ack(delivery_tag=t) for t in acks if t > watermark)
        return frames

    def _flush(self) -> None:
        self._scheduled = False
        frames = self._frames()
        if not frames:
            return
        if self._channel.is_closed:
            # The broker has already put these back in their queues; nothing is lost.
            log.debug("settle_dropped_channel_closed", frames=len(frames))
            return
        payload = ChannelFrame.marshall(channel_number=self._channel.number, frames=frames)
        queue = self._channel.write_queue  # type: ignore[attr-defined]  # aiormq's, in order
        if self._backlog or queue.full():
            self._backlog.append(payload)
            if self._sender is None:
                self._sender = self._loop.create_task(self._send_backlog(queue))
            return
        queue.put_nowait(payload)

    async def _send_backlog(self, queue: asyncio.Queue[ChannelFrame]) -> None:
        try:
            while self._backlog:
                await queue.put(self._backlog[0])
                self._backlog.popleft()
        finally:
            self._sender = None

    async def drain(self) -> None:
        """Wait until everything settled so far is written to the socket.

        A marker frame with no content goes through aiormq's writer after the
        settlements (its queue is FIFO); the writer resolves it once drained.
        """
        if self._channel.is_closed:
            return
        if self._scheduled:
            self._flush()
        while self._sender is not None:
            await asyncio.shield(self._sender)
        written = self._loop.create_future()
        queue = self._channel.write_queue  # type: ignore[attr-defined]
        await queue.put(
            ChannelFrame.marshall(
                channel_number=self._channel.number, frames=[], drain_future=written
            )
        )
        await written
