"""The transport seam: the few AMQP operations the bus needs, and nothing else.

Everything above this seam (topology, envelopes, retries through delay levels,
dead-lettering, commands) is written once in terms of exchanges, queues,
bindings and deliveries. ``amqp.py`` maps these calls onto aio-pika;
``memory/`` implements them with an in-process broker that keeps the same
observable semantics, so one test suite at this seam (``tests/transport``)
and one at the bus (``tests/contract``) can prove the two agree.

Transports translate their library's errors into ``banyan_bus.errors`` at this
edge; nothing from aio-pika/aiormq escapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeAlias

#: The exchange types the bus declares (and so the ones ``memory://`` emulates).
ExchangeType: TypeAlias = Literal["topic", "direct", "fanout", "x-consistent-hash"]
HeaderScalar: TypeAlias = str | int | float | bool | bytes | datetime | None
HeaderValue: TypeAlias = HeaderScalar | list["HeaderValue"] | dict[str, "HeaderValue"]
Headers: TypeAlias = dict[str, HeaderValue]
Arguments: TypeAlias = Mapping[str, HeaderValue]

#: The name of AMQP's default exchange, which routes to the queue named by the routing key.
DEFAULT_EXCHANGE = ""


@dataclass(slots=True)
class OutgoingMessage:
    """What the bus hands to a transport to publish: AMQP properties and a body."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    message_type: str | None = None
    timestamp: datetime | None = None
    headers: Headers = field(default_factory=dict)
    priority: int | None = None
    content_type: str = "application/json"
    reply_to: str | None = None
    persistent: bool = True
    #: Per-message TTL in ms: the broker drops the message if no consumer took it by then.
    expiration: int | None = None


class Delivery(ABC):
    """One message delivered to a consumer, with the means to settle it once.

    ``ack``/``nack``/``reject`` are AMQP's: ``reject`` (and ``nack(requeue=False)``)
    dead-letters through the queue's ``x-dead-letter-*`` arguments if it has them.

    Settling a delivery whose connection (or channel) has closed raises
    ``SettleError`` on every transport: the broker has already requeued the
    message and will redeliver it, so the caller logs it and moves on; the
    delivery counts as settled from then on. Settling twice is a programming
    error and raises ``RuntimeError``.
    """

    __slots__ = (
        "body",
        "content_type",
        "correlation_id",
        "exchange",
        "headers",
        "message_id",
        "message_type",
        "priority",
        "redelivered",
        "reply_to",
        "routing_key",
        "timestamp",
    )

    def __init__(
        self,
        *,
        body: bytes,
        headers: Headers,
        message_id: str | None,
        correlation_id: str | None,
        message_type: str | None,
        timestamp: datetime | None,
        priority: int | None,
        content_type: str | None,
        reply_to: str | None,
        redelivered: bool,
        exchange: str,
        routing_key: str,
    ) -> None:
        self.body = body
        self.headers = headers
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.message_type = message_type
        self.timestamp = timestamp
        self.priority = priority
        self.content_type = content_type
        self.reply_to = reply_to
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key

    @abstractmethod
    async def ack(self) -> None:
        """Remove the message from its queue: it was handled (or moved elsewhere, confirmed)."""

    @abstractmethod
    async def nack(self, *, requeue: bool = True) -> None:
        """Give the message back to its queue (``requeue=True``) or dead-letter it."""

    @abstractmethod
    async def reject(self) -> None:
        """Refuse the message: the queue dead-letters it (or drops it if it has no DLX)."""

    @property
    @abstractmethod
    def settled(self) -> bool:
        """True once ack, nack or reject was called."""

    @property
    def stale(self) -> bool:
        """True once the connection it came on is gone: the broker has already
        requeued it for another consumer, so it must not be handled here."""
        return False


DeliveryCallback: TypeAlias = Callable[[Delivery], Awaitable[None]]


class Consumer(ABC):
    """A running consumer; ``cancel`` stops new deliveries (in-flight ones stay unsettled)."""

    @abstractmethod
    async def cancel(self) -> None: ...


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a passive declare tells about a queue."""

    name: str
    messages: int
    consumers: int


class Transport(ABC):
    """A connection to a broker, seen as AMQP 0-9-1 nouns.

    Declarations are idempotent: declaring what exists with the same arguments
    succeeds; with other arguments raises ``TopologyMismatch`` naming both sets.
    """

    #: The URL this transport connects to, with any password masked. For messages.
    display_url: str

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raises ``BrokerUnreachable`` naming ``display_url``."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection. Unacked deliveries go back to their queues."""

    @abstractmethod
    def on_connection_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the connection closes or is lost (every time).

        Deliveries in flight at that moment are stale: the broker requeues them.
        """

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while the connection is open: False while it is being re-established
        (the AMQP transport reconnects by itself), and before ``connect``/after ``close``.

        A cheap, local answer (no broker round-trip): what ``bus.health()`` reads.
        """

    @abstractmethod
    def consuming(self, queue: str) -> bool:
        """True while a consumer of this connection takes ``queue``'s messages: started,
        not cancelled, and its channel open (False between a connection loss and the
        consumer's recovery, or after the broker cancelled it). Cheap and local."""

    def declaring(self, count: int, *, consumers: int = 0) -> AbstractAsyncContextManager[int]:
        """``count`` declarations follow (``declarations.apply``), and ``consumers``
        consumers will start meanwhile: how many declarations may be in flight at once
        while this context lasts.

        One here: each declaration waits for the one before. The RabbitMQ transport
        lends a large batch a few channels, one declaration in flight on each
        (``amqp_topology``), so that a service with many subscriptions does not pay
        one broker round trip after another; it keeps room for the consumers' channels.
        """
        return nullcontext(1)

    @abstractmethod
    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None: ...

    @abstractmethod
    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None: ...

    @abstractmethod
    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None: ...

    @abstractmethod
    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None: ...

    @abstractmethod
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: OutgoingMessage,
        *,
        confirm: bool = True,
        mandatory: bool = False,
    ) -> None:
        """Publish one message.

        With ``confirm=True`` this returns only once the broker has taken
        responsibility for the message (stored on every queue it routed to).
        Raises ``BusCapacityExceeded`` when a full queue refused it,
        ``Unroutable`` when ``mandatory`` and no queue got it, ``PublishError``
        for any other unconfirmed outcome (including a lost connection).
        """

    @abstractmethod
    async def consume(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        cancel_on_loss: bool = False,
    ) -> Consumer:
        """Start delivering ``queue``'s messages to ``callback``.

        At most ``prefetch`` deliveries are unsettled at once. The callback runs
        in its own task per delivery; it must settle the delivery.

        When the connection is lost, the broker hands the unsettled deliveries to
        another consumer. By default a running callback finishes anyway (its
        settle then fails with ``SettleError``): a handler stopped after its side
        effect, before an idempotency key was recorded, would run twice.
        ``cancel_on_loss=True`` cancels running callbacks at once instead, for
        consumers whose order another instance continues (ordered streams).
        """

    @abstractmethod
    async def start_replies(self, callback: Callable[[Delivery], None]) -> str:
        """Start receiving replies (RabbitMQ's direct reply-to); returns the address to
        put in ``reply_to``. Replies are settled on arrival (no ack needed). Requests
        that expect a reply must be published with ``confirm=True``.
        """

    @abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """Take one message (basic.get, unacked) or ``None`` when the queue is empty."""

    @abstractmethod
    async def queue_state(self, queue: str) -> QueueState | None:
        """Message and consumer counts, or ``None`` if the queue does not exist."""

    @abstractmethod
    async def exchange_exists(self, name: str) -> bool:
        """Whether exchange ``name`` exists (a passive declare).

        Asking about the default exchange (``""``) answers ``False``: RabbitMQ
        refuses any declare of it, passive or not. Publishing to it needs no check.
        """

    @abstractmethod
    async def purge_queue(self, queue: str) -> int:
        """Drop every ready message of ``queue``; returns how many."""

    @abstractmethod
    async def delete_queue(self, queue: str) -> None: ...

    @abstractmethod
    async def delete_exchange(self, name: str) -> None: ...
