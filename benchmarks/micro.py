"""banyan_bus's own per-message cost, without a broker or a network.

::

    python benchmarks/micro.py [--n 20000] [--rounds 5]

Feeds in-memory deliveries of the benchmark's 1 KiB event through the consumer
engine (``SubscriptionConsumer._on_delivery``) and publishes through ``encode``,
next to what raw aio-pika code does for the same message (``model_validate_json``
then ``ack``; ``model_dump_json``), interleaved. The difference is what banyan_bus adds per
message on top of the client library; the network and aio-pika's own frame
handling, which both pay alike, are left out. Prints CPU µs per message (best of
``--rounds``), one line per path.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from banyan_bus.consume import Subscription, SubscriptionConsumer
from banyan_bus.contracts import ContractRegistry
from banyan_bus.envelope import encode
from banyan_bus.handlers import function_handler
from banyan_bus.retry import RetryPolicy
from banyan_bus.telemetry import Telemetry
from banyan_bus.transport.base import Delivery, Headers
from banyan_bus.transport.memory import MemoryTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import Banyan, Payload, fields  # the benchmarks' own 1 KiB payload

# The benchmarks' own contract (BenchItemCreated), as workload 3 consumes it.
MicroItemCreated: Any = Banyan("memory://", "quorum").contract
FIELDS: dict[str, Any] = fields(1)


class FakeDelivery(Delivery):
    """What a transport hands the engine; settling costs nothing here."""

    __slots__ = ("_settled",)

    def __init__(self, body: bytes, headers: Headers, message_type: str | None) -> None:
        super().__init__(
            body=body,
            headers=headers,
            message_id="evt_1",
            correlation_id="cor_1",
            message_type=message_type,
            timestamp=datetime.now(UTC),
            priority=2,
            content_type="application/json",
            reply_to=None,
            redelivered=False,
            exchange="exchange.platform.events.bench.benchitemcreated",
            routing_key="",
        )
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    async def ack(self) -> None:
        self._settled = True

    async def nack(self, *, requeue: bool = True) -> None:
        self._settled = True

    async def reject(self) -> None:
        self._settled = True


async def _time(n: int, one: Callable[[], Awaitable[None]]) -> float:
    start = time.process_time()
    for _ in range(n):
        await one()
    return (time.process_time() - start) / n * 1e6


async def main(n: int, rounds: int) -> None:
    registry = ContractRegistry()
    registry.register(MicroItemCreated)
    event = MicroItemCreated(**FIELDS)
    out = encode(event, service_name="micro")
    seen = 0

    async def handler(e: MicroItemCreated) -> None:
        nonlocal seen
        seen += 1

    sub = Subscription(
        message_type=MicroItemCreated.__message_type__,
        group="bench",
        handlers=[function_handler(MicroItemCreated, handler)],
        concurrency=1000,
        prefetch=1000,
        auto_ack=True,
        retry=RetryPolicy(),
        timeout=30.0,
    )

    async def no_delays() -> None:
        return None

    consumer = SubscriptionConsumer(
        sub,
        transport=MemoryTransport(),  # never used: nothing here publishes
        registry=registry,
        ensure_delays=no_delays,
        telemetry=Telemetry("micro", "rabbitmq"),
        service="micro",
        max_message_size=256 * 1024,
    )

    async def banyan_consume() -> None:
        await consumer._on_delivery(FakeDelivery(out.body, out.headers, out.message_type))

    raw_body = Payload(**FIELDS).model_dump_json().encode()
    validate = Payload.model_validate_json

    async def raw_handler(p: Payload) -> None:
        nonlocal seen
        seen += 1

    async def raw_consume() -> None:
        delivery = FakeDelivery(raw_body, {}, None)
        await raw_handler(validate(delivery.body))
        await delivery.ack()

    async def banyan_encode() -> None:
        encode(MicroItemCreated(**FIELDS), service_name="micro")

    async def raw_encode() -> None:
        Payload(**FIELDS).model_dump_json().encode()

    paths = (
        ("consume  raw   ", raw_consume),
        ("consume  banyan", banyan_consume),
        ("publish  raw    (model + dump)", raw_encode),
        ("publish  banyan (model + encode)", banyan_encode),
    )
    # Interleaved (A B C D A B C D ...), so each path sees the machine as the others do.
    best = dict.fromkeys((name for name, _ in paths), float("inf"))
    for _ in range(rounds):
        for name, fn in paths:
            best[name] = min(best[name], await _time(n, fn))
    for name, _ in paths:
        print(f"{name:34} {best[name]:7.2f} µs/msg")
    assert seen == 2 * n * rounds, seen


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
