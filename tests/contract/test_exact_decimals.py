"""Decimals travel as JSON numbers and arrive with every digit they were sent with (read
with parse_float=Decimal, not through a float). Runs on memory:// and amqp://."""

from __future__ import annotations

from decimal import Decimal

from banyan_bus import Event, MessageBus
from tests.support import wait_until


class InvoiceSettled(Event):
    invoice_id: str
    total: Decimal
    parts: list[Decimal] = []


async def test_decimals_arrive_with_every_digit(bus_url: str, unique) -> None:
    got: list[InvoiceSettled] = []

    async def settle(event: InvoiceSettled) -> None:
        got.append(event)

    bus = MessageBus(unique("ledger"), bus_url)
    await bus.subscribe(InvoiceSettled, settle)
    sent = InvoiceSettled(
        invoice_id="inv_1",
        total=Decimal("12345678901234567.89"),
        parts=[Decimal("1.0000000000000000001"), Decimal("99.990"), Decimal("-1E+3")],
    )
    async with bus:
        await bus.publish(sent)
        await wait_until(lambda: bool(got), timeout=10, what="the invoice")
    assert got[0].total == sent.total
    assert str(got[0].total) == "12345678901234567.89"
    assert [str(p) for p in got[0].parts] == ["1.0000000000000000001", "99.990", "-1E+3"]
