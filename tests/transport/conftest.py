"""The seam-level suite: every test runs on ``memory://`` and on a real RabbitMQ.

``transport`` is a connected transport on a private broker (a memory broker,
or a fresh vhost), once per transport; ``open_transport()`` opens another
connection to the same broker. The memory emulator's claims about RabbitMQ are
held here against RabbitMQ: where the two disagree, the emulator is wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from banyan_bus.transport.amqp import AmqpTransport
from banyan_bus.transport.base import Transport
from banyan_bus.transport.memory import MemoryTransport

OpenTransport = Callable[[], Awaitable[Transport]]


@pytest.fixture
async def open_transport(bus_url: str) -> AsyncIterator[OpenTransport]:
    opened: list[Transport] = []

    async def open_one() -> Transport:
        t: Transport = (
            MemoryTransport(bus_url) if bus_url.startswith("memory://") else AmqpTransport(bus_url)
        )
        await t.connect()
        opened.append(t)
        return t

    yield open_one
    for t in opened:
        await t.close()


@pytest.fixture
async def transport(open_transport: OpenTransport) -> Transport:
    return await open_transport()


@pytest.fixture
def on_memory(bus_url: str) -> bool:
    """True on the memory run: for claims about the emulator's own wording."""
    return bus_url.startswith("memory://")
