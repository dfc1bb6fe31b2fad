"""``Order``: an event-sourced aggregate over the ``order-{id}`` stream.

The aggregate's state is never stored, only its events: ``load`` replays the
stream, commands (``place``, ``mark_paid``, ``ship``) check the rules against that
state and *record* new events in ``uncommitted_events``, and ``save`` appends them
with ``expected_version`` = the version that was loaded. If another writer touched
the order in between, the append raises ``ConcurrencyError`` and nothing is
written or published -- the caller reloads and tries again. Because ``save`` runs
in a unit of work, the events reach the bus through the outbox, atomically::

    async with store.unit_of_work() as uow:
        order = await Order.load(uow, "ord_1")
        order.place(customer_id="c_1", total=Decimal("9.90"))
        await order.save(uow)
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Literal

from banyan_bus import Event
from banyan_bus.eventstore import StoredEvent, UnitOfWork
from contracts.orders import OrderPlaced, OrderShipped, PaymentProcessed

OrderStatus = Literal["new", "placed", "paid", "shipped"]


class OrderRuleViolated(ValueError):
    """A command does not fit the order's state (paying an order never placed, ...).

    The caller's fault: nothing was recorded; fix the request, do not retry it.
    """


def stream_name(order_id: str) -> str:
    return f"order-{order_id}"


class Order:
    """One order's state, rebuilt from its events; new events wait in ``uncommitted_events``."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.status: OrderStatus = "new"
        self.customer_id: str | None = None
        self.total = Decimal(0)
        self.currency = "EUR"
        self.payment_id: str | None = None
        self.tracking_number: str | None = None
        #: The stream version this state was loaded at: the ``expected_version`` of ``save``.
        self.version = 0
        self.uncommitted_events: list[Event] = []

    def __repr__(self) -> str:
        return f"<Order {self.order_id} {self.status} v{self.version}>"

    @property
    def stream(self) -> str:
        return stream_name(self.order_id)

    @classmethod
    def from_events(cls, order_id: str, events: Sequence[StoredEvent]) -> Order:
        """Replay stored events (oldest first) into a fresh aggregate."""
        order = cls(order_id)
        for stored in events:
            order._apply(stored.event)
            order.version = stored.version
        return order

    @classmethod
    async def load(cls, uow: UnitOfWork, order_id: str) -> Order:
        return cls.from_events(order_id, await uow.read_stream(stream_name(order_id)))

    async def save(self, uow: UnitOfWork) -> int:
        """Append the uncommitted events, expecting the loaded version; return the new one."""
        if not self.uncommitted_events:
            return self.version
        self.version = await uow.append(
            self.stream, self.uncommitted_events, expected_version=self.version
        )
        self.uncommitted_events = []
        return self.version

    # -- commands: check the rules, then record --------------------------------------

    def place(self, customer_id: str, total: Decimal, currency: str = "EUR") -> None:
        if self.status != "new":
            raise OrderRuleViolated(f"order {self.order_id} is already {self.status}")
        if total <= 0:
            raise OrderRuleViolated(f"order {self.order_id}: total must be > 0, got {total}")
        self._record(
            OrderPlaced(
                order_id=self.order_id, customer_id=customer_id, total=total, currency=currency
            )
        )

    def mark_paid(self, payment_id: str, amount: Decimal) -> None:
        if self.status != "placed":
            raise OrderRuleViolated(f"order {self.order_id} is {self.status}, not placed")
        if amount != self.total:
            raise OrderRuleViolated(
                f"order {self.order_id}: paid {amount}, but the total is {self.total}"
            )
        self._record(PaymentProcessed(payment_id=payment_id, order_id=self.order_id, amount=amount))

    def ship(self, carrier: str, tracking_number: str) -> None:
        if self.status != "paid":
            raise OrderRuleViolated(f"order {self.order_id} is {self.status}, not paid")
        self._record(
            OrderShipped(order_id=self.order_id, carrier=carrier, tracking_number=tracking_number)
        )

    # -- events: change state, no rules (history is never refused) --------------------

    def _record(self, event: Event) -> None:
        self._apply(event)
        self.uncommitted_events.append(event)

    def _apply(self, event: object) -> None:
        match event:
            case OrderPlaced():
                self.status = "placed"
                self.customer_id = event.customer_id
                self.total = event.total
                self.currency = event.currency
            case PaymentProcessed():
                self.status = "paid"
                self.payment_id = event.payment_id
            case OrderShipped():
                self.status = "shipped"
                self.tracking_number = event.tracking_number
            case _:
                pass  # events this version of the aggregate does not know change nothing
