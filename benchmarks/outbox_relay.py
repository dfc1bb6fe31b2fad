"""Outbox relay throughput on PostgreSQL into the local RabbitMQ, with a correctness check.

    python benchmarks/outbox_relay.py [--events 20000] [--streams 200] [--relays 1]
                                      [--batch-size 200] [--postgres URL]

1. A fresh PostgreSQL schema and a fresh RabbitMQ vhost (``tests/brokers.py``).
2. A consumer bus declares its queue, then stops (the durable queue keeps what arrives).
3. ``--events`` events over ``--streams`` streams are appended through units of work
   (so the outbox holds them, interleaved across streams).
4. Timed: ``--relays`` relays (each its own pool and connection) drain the outbox,
   publishing with confirms. Throughput = events / seconds until the outbox is empty.
5. Check: the consumer (an ordered subscription) starts again and must receive every
   stored message id, and each stream's events in order; the run fails otherwise.

Schema and vhost are dropped afterwards, pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from banyan_bus import Event, MessageBus, MessageContext
from banyan_bus.eventstore import PostgresEventStore
from banyan_bus.outbox import OutboxRelay
from tests import brokers


class BenchTicked(Event):
    stream: str
    seq: int
    blob: str


async def run(args: argparse.Namespace) -> float:
    schema = f"banyan_bench_{uuid.uuid4().hex[:10]}"
    vhost = f"banyan-bench-outbox-{uuid.uuid4().hex[:8]}"
    amqp_url = brokers.create_vhost(vhost)
    stores: list[PostgresEventStore] = []
    try:
        writer = PostgresEventStore(args.postgres, schema=schema)
        await writer.open()
        stores.append(writer)

        received: dict[str, list[int]] = {}
        ids: set[str] = set()

        async def handle(event: BenchTicked, ctx: MessageContext) -> None:
            received.setdefault(event.stream, []).append(event.seq)
            ids.add(ctx.id)

        consumer = MessageBus("bench-outbox-consumer", amqp_url)
        await consumer.subscribe(BenchTicked, handle, ordered=True, concurrency=50)
        await consumer.start()
        await consumer.stop()  # the queue exists and keeps what the relays publish

        per_stream = args.events // args.streams
        blob = "x" * args.payload
        t0 = time.perf_counter()
        for seq in range(1, per_stream + 1):
            async with writer.unit_of_work() as uow:
                for s in range(args.streams):
                    stream = f"bench-{s:04d}"
                    await uow.append(
                        stream,
                        [BenchTicked(stream=stream, seq=seq, blob=blob)],
                        expected_version=seq - 1,
                    )
        total = per_stream * args.streams
        append_s = time.perf_counter() - t0
        print(f"appended {total} events in {append_s:.2f} s ({total / append_s:,.0f} events/s)")

        relays: list[OutboxRelay] = []
        buses: list[MessageBus] = []
        for i in range(args.relays):
            store = PostgresEventStore(args.postgres, schema=schema)
            await store.open()
            stores.append(store)
            bus = MessageBus(f"bench-outbox-relay-{i}", amqp_url)
            await bus.start()
            buses.append(bus)
            relays.append(OutboxRelay(store, bus, batch_size=args.batch_size, poll_interval=0.01))

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(r.run()) for r in relays]
        # Polling the database is the measurement itself (the relays know nothing of it).
        while await writer.count_unsent():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        for r in relays:
            r.stop()
        await asyncio.gather(*tasks)
        for bus in buses:
            await bus.stop()
        rate = total / elapsed
        split = "+".join(str(r.published) for r in relays)
        print(
            f"relayed {total} events in {elapsed:.2f} s: {rate:,.0f} events/s "
            f"({args.relays} relay(s), batch {args.batch_size}, published {split})"
        )

        stored = {
            e.message_id
            for s in range(args.streams)
            for e in await writer.read_stream(f"bench-{s:04d}")
        }
        await consumer.start()
        deadline = time.monotonic() + 120
        while ids != stored and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.1)
        await consumer.stop()
        missing = stored - ids
        if missing:
            raise SystemExit(f"FAILED: {len(missing)} of {len(stored)} ids never arrived")
        disordered = [
            s
            for s, seqs in received.items()
            if list(dict.fromkeys(seqs)) != list(range(1, per_stream + 1))
        ]
        if disordered:
            raise SystemExit(f"FAILED: {len(disordered)} streams out of order: {disordered[:5]}")
        print(
            f"check: all {len(stored)} ids received, "
            f"{sum(map(len, received.values())) - len(ids)} duplicates, "
            f"every stream in order (ordered subscription, partition key = stream)"
        )
        return rate
    finally:
        for store in stores:
            await store.close()
        conn = await asyncpg.connect(args.postgres)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        brokers.retire_vhost(vhost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--relays", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--payload", type=int, default=1000, help="bytes of filler per event")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
