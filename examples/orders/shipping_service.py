"""shipping-service: ships an order once it is paid, and announces ``OrderShipped``.

``ShipOrder`` handles ``OrderPlaced`` but may only ship a paid order. It does
not poll: it raises ``OrderNotPaidYet``, and the retry policy tries again a
second later, until ``RecordPayment`` has seen the payment. An order that is
never paid ends in the dead-letter queue after the last try, with the reason,
for an operator to look at.

Both subscriptions are ordered by order id (the contracts' partition key): a
retry waits in place, holding its order's key, so a later event of the same
order cannot overtake it, while other orders go on. ``RecordPayment`` is in a
group of its own on purpose: a group's ordered subscriptions share one stream
(one key's events of all types in publish order), so in one group the
payment would queue behind the ``OrderPlaced`` that is waiting for it.

The paid-orders ledger is in memory here; with several instances it must be
shared (a database table), or an instance might wait for a payment that
another instance recorded.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.orders.shipping_service:bus
"""

from __future__ import annotations

import uuid

from dishka import Provider, Scope, provide

from banyan_bus import EventHandler, Logger, MessageBus, RetryPolicy
from contracts.orders import OrderPlaced, OrderShipped, PaymentProcessed

SERVICE = "shipping-service"

#: One retry a second, five times: plenty for a payment that takes a moment.
WAIT_FOR_PAYMENT = RetryPolicy(delayed=5, base=1.0, factor=1.0, cap=1.0, jitter=0.0)


class OrderNotPaidYet(Exception):
    """The order's payment has not arrived yet; retried by the policy."""


class PaidOrders:
    """Which orders are paid (a table in real life)."""

    def __init__(self) -> None:
        self.payments: dict[str, str] = {}


class ShippingProvider(Provider):
    ledger = provide(PaidOrders, scope=Scope.APP)


#: Not SERVICE: an ordered group of its own, so the payment never waits behind ShipOrder.
PAYMENTS_GROUP = f"{SERVICE}-payments"


@EventHandler(PaymentProcessed, ordered=True, subscription_group=PAYMENTS_GROUP)
class RecordPayment:
    def __init__(self, ledger: PaidOrders, log: Logger) -> None:
        self.ledger = ledger
        self.log = log

    async def handle(self, event: PaymentProcessed) -> None:
        if event.succeeded:
            self.ledger.payments[event.order_id] = event.payment_id
            self.log.info("payment_recorded", order_id=event.order_id)


@EventHandler(OrderPlaced, ordered=True, retry=WAIT_FOR_PAYMENT)
class ShipOrder:
    def __init__(self, ledger: PaidOrders, bus: MessageBus, log: Logger) -> None:
        self.ledger = ledger
        self.bus = bus
        self.log = log

    async def handle(self, event: OrderPlaced) -> None:
        if event.order_id not in self.ledger.payments:
            self.log.info("waiting_for_payment", order_id=event.order_id)
            raise OrderNotPaidYet(f"order {event.order_id} is not paid yet")
        tracking = f"TRK{uuid.uuid4().hex[:10].upper()}"
        await self.bus.publish(
            OrderShipped(order_id=event.order_id, carrier="ParcelCo", tracking_number=tracking),
            partition_key=event.order_id,
        )
        self.log.info("order_shipped", order_id=event.order_id, tracking=tracking)


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, providers=[ShippingProvider()], publishes=[OrderShipped])
    bus.include(RecordPayment, ShipOrder)
    return bus


bus = create_bus()
