"""Cost curve: payload size. 128 B, 1 KiB, 16 KiB and 256 KiB events (the size of the
event's JSON payload; the envelope adds ≈ 400 B), published with confirms, pipelined,
then consumed from the pre-filled queue: msg/s, MB/s (of envelope bodies) and client
CPU µs per message for each.

Publishing: one bus, a window of unconfirmed publishes (500, fewer for big messages:
at most 16 MiB in flight), timed from the first publish to the last confirm; the
queue then holds exactly N. Consuming: a second bus subscribed with prefetch =
concurrency (1000, fewer for big messages: at most 32 MiB unacked), timed from the
first handled message to the last; each id handled once, the queue and the DLQ empty
afterwards. The 256 KiB point needs ``max_message_size`` above its 256 KiB default
(the envelope is larger than the payload), so every point sets it to 1 MiB.

Run alone: ``python benchmarks/curves.py --only payload [--quick]``.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import curves

from banyan_bus import Event, MessageBus

TITLE = "payload size: publish (confirmed, pipelined) and consume"
SIZES = (128, 1024, 16 * 1024, 256 * 1024)
GROUP = "payload-curve"
MAX_MESSAGE_SIZE = 1024 * 1024


class PayloadBlobSent(Event):
    seq: int
    data: str


def label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def padding(size: int) -> str:
    """The ``data`` that makes the payload's JSON ``size`` bytes (for a 6-digit seq)."""
    bare = len(PayloadBlobSent(seq=100000, data="").model_dump_json(by_alias=True))
    return "x" * max(0, size - bare)


def envelope_bytes(event: PayloadBlobSent) -> int:
    """Bytes of the envelope body on the wire (the bus's own encoder; for reporting)."""
    from banyan_bus.envelope import encode

    return len(encode(event, service_name=GROUP, max_size=MAX_MESSAGE_SIZE).body)


def count_for(size: int, quick: bool) -> int:
    if quick:
        return max(50, min(1000, (4 << 20) // size))
    return max(500, min(20000, (64 << 20) // size))


async def point(base_url: str, size: int, n: int) -> dict[str, Any]:
    async with curves.point_vhost(base_url, f"payload-{size}") as url:
        pad = padding(size)
        payload_bytes = len(PayloadBlobSent(seq=100000, data=pad).model_dump_json(by_alias=True))
        body_bytes = envelope_bytes(PayloadBlobSent(seq=100000, data=pad))
        window = max(8, min(500, (16 << 20) // body_bytes))
        prefetch = max(16, min(1000, (32 << 20) // body_bytes))
        seen = curves.Seen(n)

        async def handle(event: PayloadBlobSent) -> None:
            if len(event.data) != len(pad):
                seen.errors.append(f"id {event.seq}: {len(event.data)} bytes of data")
            seen.hit(event.seq)

        def bus(name: str) -> MessageBus:
            return MessageBus(name, url, max_message_size=MAX_MESSAGE_SIZE)

        setup = bus("payload-setup")  # declares the group's queue, consumes nothing
        await setup.subscribe(PayloadBlobSent, handle, subscription_group=GROUP)
        async with setup:
            queues = curves.queue_names(setup, exclude_prefix=curves.DELAY_LEVEL_PREFIX)
        group_queue = next(q for q in queues if not q.startswith("dlq."))

        publisher = bus("payload-publisher")
        async with publisher:
            events = [PayloadBlobSent(seq=i, data=pad) for i in range(n)]
            cpu0, t0 = time.process_time(), time.monotonic()
            await curves.pipeline(n, window, lambda i: publisher.publish(events[i]))
            t1, cpu1 = time.monotonic(), time.process_time()
        depth = (await curves.queue_depths(url, [group_queue]))[group_queue]
        curves.check(depth == n, f"{label(size)}: queue holds {depth} after publishing {n}")

        consumer = bus("payload-consumer")
        await consumer.subscribe(
            PayloadBlobSent,
            handle,
            subscription_group=GROUP,
            concurrency=prefetch,
            prefetch=prefetch,
        )
        async with consumer:
            await curves.wait_all([seen], 60 + n * body_bytes / 2e6, f"{label(size)} consume")
        seen.check(f"{label(size)} consume")
        await curves.expect_empty(url, queues)
        pub_s = t1 - t0
        con_s = seen.t_last - seen.t_first
        con_n = max(1, n - 1)  # the consume window runs from the first message to the last
        common = {"payload_bytes": payload_bytes, "body_bytes": body_bytes, "n": n}
        return {
            "publish": {
                **common,
                "in_flight": window,
                "msgs_s": n / pub_s,
                "mb_s": n * body_bytes / pub_s / 1e6,
                "cpu_us": (cpu1 - cpu0) / n * 1e6,
            },
            "consume": {
                **common,
                "in_flight": prefetch,
                "msgs_s": con_n / con_s if con_s > 0 else float("nan"),
                "mb_s": con_n * body_bytes / con_s / 1e6 if con_s > 0 else float("nan"),
                "cpu_us": (seen.cpu_last - seen.cpu_first) / con_n * 1e6,
            },
        }


async def measure_async(url: str, quick: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        n = count_for(size, quick)
        head = {"size": label(size), "size_bytes": size}
        measured: list[dict[str, Any]] = []
        row = await curves.run_point(measured, head, partial(point, url, size, n))
        if not row["ok"]:
            rows += [{**row, "direction": d} for d in ("publish", "consume")]
            continue
        for direction in ("publish", "consume"):
            rows.append({"direction": direction, **head, **row[direction], "ok": True})
    return {
        "key": "payload",
        "title": TITLE,
        "x": "size_bytes",
        "xlabel": "payload size (bytes, log scale)",
        "plots": [
            {
                "y": "msgs_s",
                "series": "direction",
                "logx": True,
                "logy": True,
                "label": "messages per second (log scale)",
            },
            {
                "y": "mb_s",
                "series": "direction",
                "logx": True,
                "logy": True,
                "label": "MB/s of envelope bodies (log scale)",
            },
            {
                "y": "cpu_us",
                "series": "direction",
                "logx": True,
                "logy": True,
                "label": "client CPU per message (µs, log scale)",
            },
        ],
        "rows": rows,
    }


def measure(url: str, quick: bool) -> dict[str, Any]:
    return curves.finish(asyncio.run(measure_async(url, quick)))
