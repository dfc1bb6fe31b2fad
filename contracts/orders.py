"""Order contracts: the order story, ordered per order id."""

from __future__ import annotations

from decimal import Decimal

from banyan_bus import Command, Event


class OrderPlaced(Event, partition_key="order_id"):
    order_id: str
    customer_id: str
    total: Decimal
    currency: str = "EUR"


class PaymentProcessed(Event, partition_key="order_id"):
    payment_id: str
    order_id: str
    amount: Decimal
    succeeded: bool = True


class OrderShipped(Event, partition_key="order_id"):
    order_id: str
    carrier: str
    tracking_number: str


class PlaceOrder(Command):
    order_id: str
    customer_id: str
    total: Decimal
