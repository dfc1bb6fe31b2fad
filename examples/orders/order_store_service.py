"""order-store-service: ``PlaceOrder`` through an event-sourced ``Order`` and the outbox.

The same job as ``order_service`` -- own ``PlaceOrder``, announce ``OrderPlaced`` --
but without the crash window between "save" and "publish": the handler appends the
order's events in a unit of work, and the :class:`~banyan_bus.outbox.OutboxRelay`
running beside the bus publishes them (same ids, in order, at least once).

Run it (SQLite file ``orders.db``; RabbitMQ if ``BANYAN_URL`` says so)::

    python -m examples.orders.order_store_service

or embed it::

    async with OrderStoreService(url, SqliteEventStore("orders.db")) as service:
        await service.bus.send(PlaceOrder(...))
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import Self

from dishka import Provider, Scope, provide

from banyan_bus import CommandHandler, Logger, MessageBus
from banyan_bus.eventstore import ConcurrencyError, EventStore, SqliteEventStore
from banyan_bus.outbox import OutboxRelay
from contracts.orders import PlaceOrder
from examples.orders.order_aggregate import Order

SERVICE = "order-store-service"
#: Tries of a command that clashes with another writer of the same order.
ATTEMPTS = 3


@CommandHandler(PlaceOrder)
class PlaceOrderHandler:
    """Places the order once: a repeated ``PlaceOrder`` (a client retry) returns the same id."""

    def __init__(self, store: EventStore, log: Logger) -> None:
        self.store = store
        self.log = log

    async def handle(self, command: PlaceOrder) -> str:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._place(command)
            except ConcurrencyError:
                # Another instance wrote this order meanwhile: reload and decide again.
                if attempt == ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _place(self, command: PlaceOrder) -> str:
        async with self.store.unit_of_work() as uow:
            order = await Order.load(uow, command.order_id)
            if order.status != "new":
                self.log.info("order_already_placed", order_id=command.order_id)
                return command.order_id
            order.place(customer_id=command.customer_id, total=command.total)
            version = await order.save(uow)
        self.log.info("order_placed", order_id=command.order_id, version=version)
        return command.order_id


class _StoreProvider(Provider):
    def __init__(self, store: EventStore) -> None:
        super().__init__()
        self._store = store

    @provide(scope=Scope.APP)
    def store(self) -> EventStore:
        return self._store


class OrderStoreService:
    """The bus, its event store and its outbox relay, started and stopped together.

    Start order: store (tables), bus (handlers), relay; stop in reverse, so the relay
    never runs against a closed bus or store.
    """

    def __init__(self, url: str | None, store: EventStore) -> None:
        self.store = store
        self.bus = MessageBus(SERVICE, url, providers=[_StoreProvider(store)])
        self.bus.include(PlaceOrderHandler)
        self.relay = OutboxRelay(store, self.bus)
        self._relay_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.store.open()
        await self.bus.start()
        self._relay_task = asyncio.create_task(self.relay.run(), name="outbox-relay")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.relay.stop()
        if self._relay_task is not None:
            await self._relay_task
        await self.bus.stop()
        await self.store.close()


async def main() -> None:  # pragma: no cover - manual run
    store = SqliteEventStore(os.environ.get("ORDERS_DB", "orders.db"))
    async with OrderStoreService(None, store):
        await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(main())
