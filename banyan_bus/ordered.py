"""Ordered streams: one group's events of every ordered type, one key at a time.

An ordered subscription group has one stream (``topology.ordered_plan``): a
consistent-hash exchange over partition queues, each with a single active
consumer across all instances, fed by every type the group subscribes to with
``ordered=True``. So a key's events of all types (``OrderPlaced``,
``OrderPaid``, ``OrderShipped`` for ``ord_123``) arrive in one queue in publish
order, and the consumer here keeps that order while they are handled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import structlog

from banyan_bus.consume import SubscriptionConsumer
from banyan_bus.contracts import routing_key_for
from banyan_bus.delivery import HandlerTasks
from banyan_bus.envelope import HEADER_PARTITION_KEY
from banyan_bus.errors import BanyanError
from banyan_bus.subscription import Subscription
from banyan_bus.topology import ordered_exchange
from banyan_bus.transport.base import Consumer, Delivery, Transport

log = structlog.get_logger("banyan_bus.consume")


class OrderedStreamConsumer:
    """A group's ordered stream (``topology.ordered_plan``): its partition queues, read
    here one key at a time, each delivery run by the engine of its event type.

    The group's ordered subscriptions of every type share the stream, so a key's
    events of all types arrive in one queue in publish order; a single active
    consumer per queue (across instances) and a chain per key here keep that order
    while they are handled: one at a time per key, in delivery order, other keys
    concurrently. Each type's engine is a ``SubscriptionConsumer`` that is never
    started itself: its handlers, retry policy (a failing event is retried in
    place, holding its key), timeout, concurrency, idempotency and DLQ are the
    type's own, exactly as for an ordered subscription to one type.

    The type is the last word of the delivery's routing key (every route into the
    stream keeps it: see ``topology``), else its ``type`` property. Subscriptions
    are looked up when a type first arrives (``subscriptions()``), so one subscribed
    after start joins the running stream. A delivery no subscription claims is
    dead-lettered as ``unknown-message-type`` by the first one.
    """

    def __init__(
        self,
        group: str,
        *,
        transport: Transport,
        subscriptions: Callable[[], Sequence[Subscription]],
        engine: Callable[[Subscription], SubscriptionConsumer],
    ) -> None:
        self.group = group
        self._transport = transport
        self._subscriptions = subscriptions
        self._make_engine = engine
        self._engines: dict[str, SubscriptionConsumer] = {}  # by the type's routing key
        # Deliveries waiting behind a running one of the same key, whatever their type.
        self._chains: dict[str, deque[Delivery]] = {}
        self._consumers: list[Consumer] = []
        self._tasks = HandlerTasks()  # shared with the engines: one shutdown, one cancel
        self._log = log.bind(group=group, stream=ordered_exchange(group))

    # -- lifecycle (what the bus asks of every consumer) ---------------------------

    async def start(self) -> None:
        subs = self._subscriptions()
        if not subs:
            return
        self._transport.on_connection_lost(self._connection_lost)
        # One prefetch for the stream's queues: the largest the group's types asked for
        # (each type's own concurrency still bounds its handlers).
        prefetch = max(sub.prefetch for sub in subs)
        for queue in subs[0].queue_names:
            self._consumers.append(
                await self._transport.consume(
                    queue, self._on_delivery, prefetch=prefetch, cancel_on_loss=True
                )
            )

    async def stop_consuming(self) -> None:
        consumers, self._consumers = self._consumers, []
        self._tasks.close()  # unstarted deliveries (and the chains behind them) go back now
        for consumer in consumers:
            await consumer.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        return await self._tasks.wait_idle(timeout)

    async def cancel_in_flight(self) -> None:
        await self._tasks.cancel_and_wait()

    def _connection_lost(self) -> None:
        """The broker hands our unacked messages to another instance now: stop
        handling them here, or a key's next event could run there before this
        one finished here."""
        self._tasks.cancel()

    # -- per delivery -----------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        """Per key, one at a time, in delivery order; other keys run concurrently.

        The transport starts one task per delivery, in delivery order, and this
        code runs synchronously up to the first ``await``: a delivery whose key
        is busy joins that key's chain before any later delivery can overtake it.
        """
        key = str(delivery.headers.get(HEADER_PARTITION_KEY, ""))
        chain = self._chains.get(key)
        if chain is not None:
            chain.append(delivery)
            return
        chain = self._chains[key] = deque()
        try:
            current: Delivery | None = delivery
            while current is not None:
                if not current.stale:
                    await self._engine(current)._on_delivery(current)
                current = chain.popleft() if chain else None
        finally:
            del self._chains[key]
            for waiting in chain:  # cancelled at shutdown: back to the queue, in order
                if not waiting.stale:
                    try:
                        await waiting.nack(requeue=True)
                    except BanyanError as exc:
                        self._log.warning(
                            "settle_failed", message_id=waiting.message_id, error=str(exc)
                        )

    def _engine(self, delivery: Delivery) -> SubscriptionConsumer:
        word = delivery.routing_key.rpartition(".")[2]
        engine = self._engines.get(word) or self._find(word)
        if engine is None:
            engine = self._find(routing_key_for(delivery.message_type or ""))
        if engine is None:  # nobody's type: the first type's engine dead-letters it
            first = self._subscriptions()[0]
            engine = self._find(routing_key_for(first.message_type))
            assert engine is not None
        return engine

    def _find(self, word: str) -> SubscriptionConsumer | None:
        engine = self._engines.get(word)
        if engine is not None or not word:
            return engine
        for sub in self._subscriptions():
            if routing_key_for(sub.message_type) == word:
                engine = self._engines[word] = self._make_engine(sub)
                engine._tasks = self._tasks
                return engine
        return None
