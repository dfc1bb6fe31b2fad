"""payment-service: charges each placed order, then announces ``PaymentProcessed``.

The gateway is slow on purpose (a real one takes a moment too), so the
shipping service sees ``OrderPlaced`` before the payment exists and has to wait
for it through retries.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.orders.payment_service:bus
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Protocol

from dishka import Provider, Scope, provide

from banyan_bus import EventHandler, Logger, MessageBus
from contracts.orders import OrderPlaced, PaymentProcessed

SERVICE = "payment-service"


class PaymentGateway(Protocol):
    async def charge(self, customer_id: str, amount: Decimal, currency: str) -> str: ...


class FakeGateway:
    """Approves everything after a short pause; returns a payment id."""

    latency_s = 0.3

    async def charge(self, customer_id: str, amount: Decimal, currency: str) -> str:
        await asyncio.sleep(self.latency_s)
        return f"pay_{uuid.uuid4().hex[:12]}"


class PaymentsProvider(Provider):
    gateway = provide(FakeGateway, provides=PaymentGateway, scope=Scope.APP)


@EventHandler(OrderPlaced, ordered=True)
class ChargeOrder:
    def __init__(self, gateway: PaymentGateway, bus: MessageBus, log: Logger) -> None:
        self.gateway = gateway
        self.bus = bus
        self.log = log

    async def handle(self, event: OrderPlaced) -> None:
        payment_id = await self.gateway.charge(event.customer_id, event.total, event.currency)
        await self.bus.publish(
            PaymentProcessed(payment_id=payment_id, order_id=event.order_id, amount=event.total),
            partition_key=event.order_id,
        )
        self.log.info("payment_processed", order_id=event.order_id, payment_id=payment_id)


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, providers=[PaymentsProvider()], publishes=[PaymentProcessed])
    bus.include(ChargeOrder)
    return bus


bus = create_bus()
