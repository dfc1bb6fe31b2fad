"""Helpers of the seam-level suite: messages, a recording consumer, bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from banyan_bus.transport.base import Arguments, Delivery, OutgoingMessage, Transport

#: Every wait is bounded; generous because a shared 2-core machine runs the broker too.
TIMEOUT = 10.0


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


async def ready(t: Transport, queue: str) -> int:
    """Ready messages of ``queue`` (what a passive declare counts)."""
    state = await t.queue_state(queue)
    assert state is not None, f"queue {queue!r} does not exist"
    return state.messages


async def settle_count(t: Transport, queue: str, count: int) -> None:
    """Wait until ``queue`` holds exactly ``count`` ready messages.

    Settling is asynchronous on AMQP (the frame goes out a loop turn later, on
    another channel than the passive declare that counts), so a count right
    after a settle is read once the broker has seen it.
    """

    async def done() -> bool:
        return await ready(t, queue) == count

    await eventually(done)


async def drain(t: Transport, queue: str) -> list[bytes]:
    """Take every ready message of ``queue`` with basic.get, acking each."""
    bodies = []
    while (d := await t.get(queue)) is not None:
        bodies.append(d.body)
        await d.ack()
    return bodies


async def queue_with_exchange(
    t: Transport,
    queue: str,
    exchange: str = "",
    key: str = "",
    arguments: Arguments | None = None,
) -> None:
    await t.declare_queue(queue, arguments=arguments)
    if exchange:
        await t.bind_queue(queue, exchange, key)
