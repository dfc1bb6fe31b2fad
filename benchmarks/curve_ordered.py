"""Cost curve: ordered subscriptions. Throughput against the number of partitions (1, 4,
16) and of distinct partition keys (10 and 10,000), with two consumer instances of one
group (two MessageBus instances in the measuring process, started together), checking
every key's order.

Each point: the group's ordered stream is declared (a bus subscribed and stopped), N
events are published with ``partition_key`` (key ``i % keys``, step ``i // keys``:
round-robin over the keys, confirmed, ``WINDOW`` in flight), then both instances start
and drain the stream. Timed from the first handled event to the last; client CPU over
the same window. Checked: every key's steps arrive as 0, 1, 2, ... with no gap, repeat
or reordering (one handler state shared by both instances, so the order holds across
them), every event handled once, the stream's partition queues and the DLQ empty.

The partition queues have a single active consumer each: an instance that registers
first on a queue keeps it, so the split between the instances (``split``) is what the
broker gave, not a balance the bus chooses.

Run alone: ``python benchmarks/curves.py --only ordered [--quick]``.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import curves

from banyan_bus import Event, MessageBus

TITLE = "ordered subscriptions: partitions x keys, two instances"
PARTITIONS = (1, 4, 16)
KEYS = (10, 10_000)
QUICK_KEYS = (10, 100)
WINDOW = 500
CONCURRENCY = 100  # handlers at once per instance (distinct keys); prefetch: the default
GROUP = "ordered-curve"


class LedgerStepRecorded(Event):
    key: str
    step: int


class KeyOrder:
    """Per-key order across both instances: each key's next step must be the last + 1."""

    def __init__(self, n: int, keys: int) -> None:
        self.n, self.keys = n, keys
        self.last = [-1] * keys
        self.by_instance = [0, 0]
        self.errors: list[str] = []
        self.seen = curves.Seen(n)

    def handler(self, instance: int) -> Any:
        async def handle(event: LedgerStepRecorded) -> None:
            k = int(event.key[1:])
            if event.step != self.last[k] + 1:
                self.errors.append(
                    f"key {event.key}: step {event.step} after {self.last[k]} (instance {instance})"
                )
            self.last[k] = max(self.last[k], event.step)
            self.by_instance[instance] += 1
            self.seen.hit(event.step * self.keys + k)

        return handle

    def check(self) -> None:
        curves.check(not self.errors, f"order broken {len(self.errors)}x: {self.errors[:3]}")
        self.seen.check("ordered stream")
        for k, last in enumerate(self.last):
            expected = (self.n - 1 - k) // self.keys if k < self.n else -1
            curves.check(last == expected, f"key k{k}: last step {last}, expected {expected}")


async def point(base_url: str, partitions: int, keys: int, n: int) -> dict[str, Any]:
    async with curves.point_vhost(base_url, f"ordered-p{partitions}-k{keys}") as url:
        order = KeyOrder(n, keys)

        async def subscribe(bus: MessageBus, instance: int) -> None:
            await bus.subscribe(
                LedgerStepRecorded,
                order.handler(instance),
                subscription_group=GROUP,
                ordered=True,
                partitions=partitions,
                concurrency=CONCURRENCY,
            )

        setup = MessageBus(GROUP, url)  # declares the stream, consumes nothing
        await subscribe(setup, 0)
        async with setup:
            queues = curves.queue_names(setup, exclude_prefix=curves.DELAY_LEVEL_PREFIX)

        publisher = MessageBus("ordered-publisher", url)
        async with publisher:
            events = [LedgerStepRecorded(key=f"k{i % keys}", step=i // keys) for i in range(n)]
            await curves.pipeline(
                n, WINDOW, lambda i: publisher.publish(events[i], partition_key=events[i].key)
            )
        depths = await curves.queue_depths(url, [q for q in queues if ".ordered-stream.p" in q])
        curves.check(sum(depths.values()) == n, f"stream holds {depths} after publishing {n}")

        instances = [MessageBus(GROUP, url), MessageBus(GROUP, url)]
        for i, bus in enumerate(instances):
            await subscribe(bus, i)
        try:
            await asyncio.gather(*(bus.start() for bus in instances))
            await curves.wait_all([order.seen], 60 + n / 300, "ordered stream")
        finally:
            await asyncio.gather(*(bus.stop() for bus in instances))
        order.check()
        await curves.expect_empty(url, queues)
        span = order.seen.t_last - order.seen.t_first
        handled = max(1, n - 1)
        return {
            "events": n,
            "partition_queues_used": sum(1 for d in depths.values() if d),
            "msgs_s": handled / span if span > 0 else float("nan"),
            "cpu_us": (order.seen.cpu_last - order.seen.cpu_first) / handled * 1e6,
            "split": "/".join(str(c) for c in order.by_instance),
        }


async def measure_async(url: str, quick: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    n = 1000 if quick else 20_000
    for keys in QUICK_KEYS if quick else KEYS:
        for partitions in PARTITIONS:
            head = {"keys": f"{keys:,} keys", "partitions": partitions}
            await curves.run_point(rows, head, partial(point, url, partitions, keys, n))
    return {
        "key": "ordered",
        "title": TITLE,
        "x": "partitions",
        "xlabel": "partition queues (log scale)",
        "plots": [
            {
                "y": "msgs_s",
                "series": "keys",
                "logx": True,
                "label": "events handled per second (both instances)",
            },
            {
                "y": "cpu_us",
                "series": "keys",
                "logx": True,
                "label": "client CPU per event handled (µs)",
            },
        ],
        "rows": rows,
    }


def measure(url: str, quick: bool) -> dict[str, Any]:
    return curves.finish(asyncio.run(measure_async(url, quick)))
