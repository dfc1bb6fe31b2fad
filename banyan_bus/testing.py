"""Test your handlers without a broker: a private ``memory://`` broker with a recorder.

The harness runs the real topology, retries and dead-lettering of the
in-process broker; it only adds what a test wants to look at: what was
published, a way to wait until every handler is done, and the DLQ.

Example::

    async def test_welcome_email() -> None:
        async with TestBroker() as broker:
            service = email_service.create_bus(broker.url)   # the real service
            async with service, broker.bus("test") as probe:
                await probe.publish(UserCreated(...))
                await broker.wait_idle()
            assert [e.to for e in broker.events(EmailSent)] == ["a@example.com"]
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from banyan_bus.bus import MessageBus
from banyan_bus.contracts import Message, registry
from banyan_bus.dlq import DeadLetter
from banyan_bus.envelope import HEADER_VERSION, decode
from banyan_bus.topology import ROOT_EXCHANGE
from banyan_bus.transport.base import Delivery, Headers, OutgoingMessage
from banyan_bus.transport.memory import MemoryBroker, drop_broker, get_broker

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Published:
    """One message as it was published: where to, its properties and body."""

    exchange: str
    routing_key: str
    message: OutgoingMessage

    @property
    def message_type(self) -> str | None:
        return self.message.message_type

    @property
    def headers(self) -> Headers:
        return self.message.headers

    def decode(self) -> Message:
        """The payload as its registered contract (by type and ``x-version``)."""
        return decode(_Recorded(self), registry).payload


class _Recorded(Delivery):
    """A publish seen as a delivery, so the real decoder reads it."""

    __slots__ = ()

    def __init__(self, published: Published) -> None:
        m = published.message
        super().__init__(
            body=m.body,
            headers=m.headers,
            message_id=m.message_id,
            correlation_id=m.correlation_id,
            message_type=m.message_type,
            timestamp=m.timestamp,
            priority=m.priority,
            content_type=m.content_type,
            reply_to=m.reply_to,
            redelivered=False,
            exchange=published.exchange,
            routing_key=published.routing_key,
        )

    @property
    def settled(self) -> bool:
        return True

    async def ack(self) -> None:  # pragma: no cover - never delivered
        raise RuntimeError("a recorded publish cannot be settled")

    async def nack(self, *, requeue: bool = True) -> None:  # pragma: no cover
        raise RuntimeError("a recorded publish cannot be settled")

    async def reject(self) -> None:  # pragma: no cover
        raise RuntimeError("a recorded publish cannot be settled")


class TestBroker:
    """A private in-process broker for one test, recording every publish."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.url = f"memory://test-{uuid.uuid4().hex}"
        self._broker: MemoryBroker = get_broker(self.url)
        self._broker.recording = True
        self._buses: list[MessageBus] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for bus in self._buses:
            await bus.stop(grace_period=0)
        drop_broker(self.url)

    def bus(self, service: str, **options: Any) -> MessageBus:
        """A ``MessageBus`` on this broker (stopped when the harness closes)."""
        bus = MessageBus(service, self.url, **options)
        self._buses.append(bus)
        return bus

    @property
    def published(self) -> list[Published]:
        """Everything published so far, retries and dead-letter moves included."""
        return [Published(e, r, m) for e, r, m in self._broker.journal]

    def events(self, contract: type[M]) -> list[M]:
        """The ``contract`` events published to the platform (not retries), decoded."""
        found: list[M] = []
        for item in self.published:
            if (
                item.exchange == ROOT_EXCHANGE
                and item.message_type == contract.__message_type__
                and item.headers.get(HEADER_VERSION) == contract.__message_version__
            ):
                event = item.decode()
                if isinstance(event, contract):
                    found.append(event)
        return found

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no consumed queue holds a message and no handler runs.

        Delayed messages (``after=``, delayed retries) are not waited for: they
        sit in the delay levels until due.
        """
        async with asyncio.timeout(timeout):
            quiet = 0
            while quiet < 3:  # idle across a few loop turns: handlers may publish more
                await asyncio.sleep(0.005)
                quiet = 0 if self._broker.busy() else quiet + 1

    async def dead_letters(
        self, bus: MessageBus, contract: type[Message], group: str | None = None
    ) -> list[DeadLetter]:
        """What ``group`` (default: the bus's service) dead-lettered for ``contract``."""
        return await bus.dlq(group or bus.service, contract).list()
