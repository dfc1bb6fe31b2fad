"""order-service: owns ``PlaceOrder`` and announces ``OrderPlaced``.

Run alone against RabbitMQ::

    BANYAN_URL=amqp://guest:guest@localhost/ banyan run examples.orders.order_service:bus
"""

from __future__ import annotations

from banyan_bus import CommandHandler, Logger, MessageBus
from contracts.orders import OrderPlaced, PlaceOrder

SERVICE = "order-service"


@CommandHandler(PlaceOrder)
class PlaceOrderHandler:
    def __init__(self, bus: MessageBus, log: Logger) -> None:
        self.bus = bus
        self.log = log

    async def handle(self, command: PlaceOrder) -> str:
        await self.bus.publish(
            OrderPlaced(
                order_id=command.order_id, customer_id=command.customer_id, total=command.total
            ),
            # Everything about one order shares its key (the contracts also default to it).
            partition_key=command.order_id,
        )
        self.log.info("order_placed", order_id=command.order_id, total=str(command.total))
        return command.order_id


def create_bus(url: str | None = None) -> MessageBus:
    bus = MessageBus(SERVICE, url, publishes=[OrderPlaced])
    bus.include(PlaceOrderHandler)
    return bus


bus = create_bus()
