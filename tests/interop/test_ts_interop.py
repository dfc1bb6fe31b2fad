"""banyan_bus and a platform TypeScript-style service (Node.js + amqplib) on one RabbitMQ.

``ts_service.js`` is written the way a platform TS service is: it knows the platform's
envelope and topology (DESIGN.md §2-§3), not banyan_bus. Both ways, 100 events each:

- **TS -> Python:** it publishes ``BillIssued`` envelopes to ``exchange.platform.events``
  with the AMQP properties; banyan_bus's handler must see every envelope field exactly
  (ids, W3C trace context, millisecond timestamps, camelCase payload to snake_case,
  JSON-number decimals to ``Decimal`` with their digits, ``...Z`` datetimes to UTC).
- **Python -> TS:** banyan_bus publishes ``PaymentReceived``; the TS side, consuming its own
  group queue ``exchange.platform.events.ts-billing.paymentreceived`` (declared like
  banyan declares a quorum group), checks every envelope field and AMQP property
  (``checkEnvelope`` / ``checkPayment`` in ts_service.js) and reports the problems.
- **One trace TS -> Python -> TS, 100 times:** the banyan handler of each ``BillIssued``
  publishes a ``BillAccepted`` follow-up; the TS side receives it with the trace id,
  trace flags and correlation id of its ``BillIssued`` (a new span id) and that event's id as
  causation id.

Finally a banyan_bus instance joins the TS service's group: it declares the same topology,
which RabbitMQ accepts only if the TS side's queue arguments are banyan's, exactly.

Expected payload values follow formulas ts_service.js computes the same way
(``expectedPayment`` / ``invoicePayload`` there, :func:`payment` here).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from banyan_bus import Event, MessageBus, MessageContext
from banyan_bus.declarations import BindingDecl, ExchangeDecl, QueueDecl
from banyan_bus.topology import QueueOptions, group_plan
from tests import brokers
from tests.interop.node import HERE, node_env
from tests.support import wait_until

COUNT = 100
TS_SERVICE = "ts-billing"
PY_SERVICE = "py-ledger"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


class BillIssued(Event):
    """What the TS service publishes."""

    invoice_id: str
    customer_id: str
    amount_due: Decimal
    issued_at: datetime
    line_count: int
    seq: int


class BillAccepted(Event):
    """banyan_bus's follow-up to a BillIssued, received by the TS service."""

    invoice_id: str
    amount_due: Decimal
    accepted_at: datetime
    seq: int


class PaymentReceived(Event, partition_key="invoice_id"):
    """What banyan_bus publishes to the TS service."""

    payment_id: str
    invoice_id: str
    amount_paid: Decimal
    exchange_rate: Decimal
    received_at: datetime
    payer_name: str
    seq: int


def payment(seq: int) -> PaymentReceived:
    """``expectedPayment(seq)`` of ts_service.js, as a contract (microseconds on purpose)."""
    return PaymentReceived(
        payment_id=f"pay_{seq}",
        invoice_id=f"inv_{seq % 10}",
        amount_paid=Decimal(f"{seq}.{seq % 100:02d}"),
        exchange_rate=Decimal(f"1.{seq:04d}000000000000001"),
        received_at=datetime(2025, 11, 15, 10, 30, 0, 123456, tzinfo=UTC) + timedelta(seconds=seq),
        payer_name=f"Zoë Ñandú {seq}",
        seq=seq,
    )


def _parse_iso(text: str) -> datetime:
    assert ISO_MS_Z.match(text), text
    return datetime.fromisoformat(text)


async def _read_json_line(stream: asyncio.StreamReader, kind: str, timeout: float) -> Any:
    """The next JSON line of ``kind`` the Node service prints (other lines are errors)."""
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, f"the Node service exited before printing {kind!r}"
    message = json.loads(line, parse_float=Decimal)  # keep the digits the TS side wrote
    assert message.get("type") == kind, f"expected {kind!r}, got {line[:500]!r}"
    return message


def _check_bill(event: BillIssued, ctx: MessageContext, sent: dict[str, Any]) -> None:
    """What banyan_bus decoded from one TS envelope is that envelope, field by field."""
    payload = sent["payload"]
    assert ctx.id == sent["id"]
    assert ctx.correlation_id == sent["correlationId"]
    assert ctx.causation_id is None
    assert ctx.service_name == TS_SERVICE
    assert ctx.message_type == "BillIssued"
    assert ctx.version == 1
    assert ctx.attempt == 1
    assert ctx.timestamp == _parse_iso(sent["timestamp"])
    trace = ctx.trace_context
    assert trace is not None
    assert (trace.trace_id, trace.span_id, trace.trace_flags) == (
        sent["traceContext"]["traceId"],
        sent["traceContext"]["spanId"],
        sent["traceContext"]["traceFlags"],
    )
    assert ctx.headers["traceparent"] == f"00-{trace.trace_id}-{trace.span_id}-01"
    assert ctx.headers["x-partition-key"] == payload["invoiceId"]
    # camelCase on the wire, snake_case in Python, every field.
    assert set(event.model_dump(by_alias=True)) == set(payload)
    assert event.invoice_id == payload["invoiceId"]
    assert event.customer_id == payload["customerId"]
    assert event.line_count == payload["lineCount"]
    assert event.seq == payload["seq"]
    # A JSON number -> Decimal with the digits the TS side wrote.
    assert isinstance(event.amount_due, Decimal)
    assert str(event.amount_due) == str(payload["amountDue"])
    # "...T09:00:00.456Z" -> an aware UTC datetime, to the millisecond.
    assert event.issued_at == _parse_iso(payload["issuedAt"])
    assert event.issued_at.utcoffset() == timedelta(0)


def _assert_declared_like_banyan(amqp_url: str, group: str, message_type: str) -> None:
    """The broker holds exactly what banyan_bus's ``group_plan`` declares for the group.

    Compared through the management API: RabbitMQ 3.10 accepts a redeclaration that
    differs in ``x-delivery-limit``, so a banyan instance joining is not proof enough.
    """
    vhost = brokers.vhost_from_url(amqp_url)
    queues = {q["name"]: q for q in brokers.list_queues(vhost)}
    exchanges = {e["name"]: e for e in brokers.list_exchanges(vhost)}
    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in brokers.list_bindings(vhost)
    }
    for decl in group_plan(group, message_type, QueueOptions()):
        if isinstance(decl, QueueDecl):
            queue = queues[decl.name]
            assert queue["arguments"] == dict(decl.arguments), decl.name
            assert queue["durable"] is True
            assert queue["auto_delete"] is False
        elif isinstance(decl, ExchangeDecl):
            exchange = exchanges[decl.name]
            assert exchange["type"] == decl.type, decl.name
            assert exchange["arguments"] == dict(decl.arguments), decl.name
            assert exchange["durable"] is True
            assert exchange["auto_delete"] is False
        else:
            assert isinstance(decl, BindingDecl)
            key = (decl.source, decl.destination, decl.destination_kind, decl.routing_key)
            assert key in bindings, key


async def test_ts_service_and_banyan_exchange_100_events_each_way(
    amqp_url: str, node_modules: Path
) -> None:
    started = time.monotonic()
    received: dict[int, tuple[BillIssued, MessageContext]] = {}
    bus = MessageBus(PY_SERVICE, amqp_url)

    async def accept(event: BillIssued, ctx: MessageContext) -> None:
        received[event.seq] = (event, ctx)
        await bus.publish(
            BillAccepted(
                invoice_id=event.invoice_id,
                amount_due=event.amount_due,
                accepted_at=event.issued_at + timedelta(hours=1),
                seq=event.seq,
            )
        )

    await bus.subscribe(BillIssued, accept)
    async with bus:
        node = await asyncio.create_subprocess_exec(
            "node",
            str(HERE / "ts_service.js"),
            env=node_env(
                node_modules,
                {
                    "AMQP_URL": amqp_url,
                    "SERVICE_NAME": TS_SERVICE,
                    "PEER_SERVICE": PY_SERVICE,
                    "COUNT": str(COUNT),
                    "TIMEOUT_MS": "40000",
                },
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,  # the "sent" line holds 100 envelopes
        )
        assert node.stdout is not None
        assert node.stderr is not None
        stderr = asyncio.create_task(node.stderr.read())
        try:
            await _read_json_line(node.stdout, "ready", timeout=30)
            for seq in range(COUNT):
                await bus.publish(payment(seq))
            sent = (await _read_json_line(node.stdout, "sent", timeout=30))["envelopes"]
            done = await _read_json_line(node.stdout, "done", timeout=50)
            code = await asyncio.wait_for(node.wait(), 10)
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
        errors = (await stderr).decode(errors="replace")
        await wait_until(lambda: len(received) == COUNT, timeout=10, what="100 BillIssued")

    # Python -> TS, and the follow-ups: what the TS side checked and found.
    report = json.dumps(
        {k: done[k] for k in ("received", "problemCount", "problems", "samples")},
        indent=2,
        default=str,
    )
    assert code == 0, f"ts_service.js exited {code}\n{errors}\n{report}"
    assert done["complete"] is True, report
    assert done["received"] == {"PaymentReceived": COUNT, "BillAccepted": COUNT}, report
    assert done["problemCount"] == 0, report

    # TS -> Python: every envelope field as the TS side wrote it.
    assert len(sent) == COUNT
    by_seq = {envelope["payload"]["seq"]: envelope for envelope in sent}
    assert sorted(received) == sorted(by_seq) == list(range(COUNT))
    for seq, (event, ctx) in received.items():
        _check_bill(event, ctx, by_seq[seq])
    traces = {envelope["traceContext"]["traceId"] for envelope in sent}
    assert len(traces) == COUNT
    assert all(HEX32.match(t) for t in traces)
    assert all(HEX16.match(envelope["traceContext"]["spanId"]) for envelope in sent)

    # A sample of what banyan_bus wrote, as the TS side received it.
    sample = json.loads(done["samples"]["PaymentReceived"], parse_float=Decimal)
    seq = sample["payload"]["seq"]
    assert sample["payload"]["amountPaid"] == Decimal(f"{seq}.{seq % 100:02d}")
    assert f'"exchangeRate":1.{seq:04d}000000000000001' in done["samples"]["PaymentReceived"]
    assert sample["payload"]["receivedAt"].endswith(".123Z")

    # The TS service declared its groups exactly as banyan_bus does, and a banyan instance
    # can join them (RabbitMQ refuses a redeclaration with other arguments).
    for message_type in ("PaymentReceived", "BillAccepted"):
        _assert_declared_like_banyan(amqp_url, TS_SERVICE, message_type)
    twin = MessageBus(TS_SERVICE, amqp_url)

    async def ignore(event: Event) -> None: ...

    await twin.subscribe(PaymentReceived, ignore)
    await twin.subscribe(BillAccepted, ignore)
    async with twin:
        pass
    assert time.monotonic() - started < 60
