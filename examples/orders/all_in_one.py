"""The whole order story in one process, on the embedded ``memory://`` broker.

    python -m examples.orders.all_in_one

Watch shipping-service wait for each payment: its handler fails while the
order is unpaid, the retry policy brings the event back a second later, and
it ships once the payment is recorded.
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal

from banyan_bus import MessageBus
from contracts.orders import OrderShipped, PlaceOrder
from examples.demo import configure_demo_logging, demo_url, line, settle
from examples.orders import order_service, payment_service, shipping_service

ORDERS = [
    PlaceOrder(order_id="ord_1001", customer_id="cus_alice", total=Decimal("42.50")),
    PlaceOrder(order_id="ord_1002", customer_id="cus_bob", total=Decimal("9.99")),
]


async def main() -> int:
    configure_demo_logging()
    url = demo_url("orders")  # in-process, whatever BANYAN_URL says (and it says so)
    services = [m.create_bus(url) for m in (order_service, payment_service, shipping_service)]
    client = MessageBus("storefront", url)
    shipped: set[str] = set()
    all_shipped = asyncio.Event()

    async def on_shipped(event: OrderShipped) -> None:
        shipped.add(event.order_id)
        print(line("storefront", "customer told", order_id=event.order_id))
        if shipped >= {o.order_id for o in ORDERS}:
            all_shipped.set()

    await client.subscribe(OrderShipped, on_shipped)
    for bus in [*services, client]:
        await bus.start()
    try:
        for order in ORDERS:
            await client.send(order, timeout=5)
            print(line("storefront", "PlaceOrder accepted", order_id=order.order_id))
        async with asyncio.timeout(15):
            await all_shipped.wait()
        await settle([*services, client])
    finally:
        for bus in [client, *services]:
            await bus.stop()
    print(line("demo", "done", shipped=len(shipped)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
