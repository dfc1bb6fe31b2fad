"""Cost curve: delays at volume. N events (1,000, 10,000 and the issue's 100,000; ``--quick``
2,000) published with ``after=`` spread evenly over one hour, then, while they wait in
the delay levels, a sample of short delays (200 events, 1-10 s in whole seconds;
``--quick`` 20 of 1-4 s) whose lateness is measured.

Reported: the publish rate of delayed events (confirmed, ``WINDOW`` in flight); the
broker's memory per waiting message, three ways: the node's memory
(``/api/nodes/<node>/memory``, before the volume and after the sample, divided by the
messages then in the delay levels; ``erlang`` is what the VM allocated, ``quorum_ets``
where a quorum queue's recent log entries, bodies included, are kept) moves by
hundreds of MB within seconds on this shared broker, so a delta below zero is reported
as none and only the largest volume stands out of that noise; the memory of the
point's own vhost's queue processes (``/api/queues/<vhost>``) is its own, but leaves out
the node-wide ETS (its ``message_bytes`` would tell the bodies' share, but quorum queues
on RabbitMQ 3.10 report 0 there for a while). And the sample's
lateness (handled time minus publish call time minus the asked delay: p50, p95, p99,
max).

Checked: every event published once (confirmed), nothing handled early, nothing
handled twice, every sample event handled, every volume event either handled (the
volume's first minute falls due during the run) or still waiting in the delay levels
(their depths, read exactly, add up), nothing dead-lettered. Then the vhost is deleted,
so the hour-long messages do not linger.

Run alone: ``python benchmarks/curves.py --only delays [--quick]``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import curves

from banyan_bus import Event, MessageBus

TITLE = "delays at volume: publish with after=, broker memory, lateness of short delays"
HOUR_MS = 3600 * 1000
WINDOW = 500
VOLUMES = (1_000, 10_000, 100_000)  # the size is the last; the others show the trend
QUICK_VOLUME = 2_000
STATS_WAIT_S = 20.0  # the management API's queue stats are refreshed every 5 s
SAMPLE_MAX_S = 10  # the short delays: 1..10 whole seconds
QUICK_SAMPLE_MAX_S = 4  # --quick: 1..4 s, to keep a CI run short
GROUP = "delays-curve"


class ReminderDelayFired(Event):
    seq: int
    sample: bool
    delay_ms: int


def envelope_bytes(event: ReminderDelayFired) -> int:
    """Bytes of the envelope body (the bus's own encoder; for reporting only)."""
    from banyan_bus.envelope import encode

    return len(encode(event, service_name=GROUP).body)


async def vhost_queues(url: str, ready: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """The management API's totals over the point's vhost's queues (their processes'
    ``memory``, their ``messages``) once ``ready`` says the stats, refreshed
    every 5 s, caught up (or after ``STATS_WAIT_S``, with what they say then)."""
    vhost = unquote(urlsplit(url).path.lstrip("/"))
    cols = ("memory", "messages")
    path = f"/api/queues/{quote(vhost, safe='')}?columns=name,{','.join(cols)}"
    deadline = time.monotonic() + STATS_WAIT_S
    while True:
        queues = await asyncio.to_thread(curves.mgmt_get, path)
        totals = {k: sum(int(q.get(k) or 0) for q in queues) for k in cols}
        totals["queues"] = len(queues)
        totals["reporting"] = sum(1 for q in queues if "memory" in q)
        if ready(totals) or time.monotonic() > deadline:
            return totals
        await asyncio.sleep(0.5)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def memory_now(readings_n: int) -> dict[str, int]:
    """The node's memory, the median of some readings a second apart (it moves with GC)."""
    readings = []
    for i in range(readings_n):
        if i:
            await asyncio.sleep(1.0)
        readings.append(await asyncio.to_thread(curves.broker_memory))
    return {k: int(statistics.median(r.get(k, 0) for r in readings)) for k in readings[0]}


async def point(base_url: str, n: int, samples: int, quick: bool) -> dict[str, Any]:
    async with curves.point_vhost(base_url, "delays") as url:
        rng = random.Random(20)
        volume_delay = [HOUR_MS * (i + 1) // n for i in range(n)]
        longest = QUICK_SAMPLE_MAX_S if quick else SAMPLE_MAX_S
        sample_delay = [rng.randint(1, longest) * 1000 for _ in range(samples)]
        volume_sent = [0.0] * n
        sample_sent = [0.0] * samples
        volume = curves.Seen(n)
        sample = curves.Seen(samples)
        early: list[str] = []
        lateness: list[float] = [0.0] * samples

        async def handle(event: ReminderDelayFired) -> None:
            now = time.monotonic()
            sent = (sample_sent if event.sample else volume_sent)[event.seq]
            late = now - sent - event.delay_ms / 1000
            if late < 0:
                early.append(f"{'sample' if event.sample else 'volume'} {event.seq}: {late:.3f} s")
            if event.sample:
                lateness[event.seq] = late
                sample.hit(event.seq)
            else:
                volume.hit(event.seq)

        bus = MessageBus(GROUP, url)
        body_bytes = envelope_bytes(ReminderDelayFired(seq=n, sample=False, delay_ms=HOUR_MS))
        await bus.subscribe(ReminderDelayFired, handle, concurrency=100)
        async with bus:
            levels = [q for q in curves.queue_names(bus) if q.startswith(curves.DELAY_LEVEL_PREFIX)]
            others = [q for q in curves.queue_names(bus) if q not in levels]
            # the delay levels exist from the start (the subscription's delayed retries)
            await curves.queue_depths(url, levels)
            # the management API's stats of the new queues (refreshed every 5 s)
            vhost0 = await vhost_queues(url, lambda q: q["reporting"] == q["queues"])
            mem0 = await memory_now(1 if quick else 3)

            async def publish_volume(i: int) -> None:
                volume_sent[i] = time.monotonic()
                await bus.publish(
                    ReminderDelayFired(seq=i, sample=False, delay_ms=volume_delay[i]),
                    after=volume_delay[i],
                )

            cpu0, t0 = time.process_time(), time.monotonic()
            await curves.pipeline(n, WINDOW, publish_volume)
            t1, cpu1 = time.monotonic(), time.process_time()

            async def publish_sample(i: int) -> None:
                sample_sent[i] = time.monotonic()
                await bus.publish(
                    ReminderDelayFired(seq=i, sample=True, delay_ms=sample_delay[i]),
                    after=sample_delay[i],
                )

            await curves.pipeline(samples, 50, publish_sample)
            await curves.wait_all([sample], 60, "short-delay sample")
            # stats that count the waiting messages (all but those handled meanwhile)
            vhost1 = await vhost_queues(url, lambda q: q["messages"] >= 0.98 * (n - volume.count))
            mem1 = await memory_now(1 if quick else 3)
            handled_at_mem1 = volume.count
        curves.check(not early, f"{len(early)} handled early, first: {early[:3]}")
        sample.check("short-delay sample")
        curves.check(not volume.errors, f"volume: {volume.errors[:3]}")
        # the bus is stopped: every volume event is handled, or waits in a level or the
        # group's queue (read until two consecutive readings agree: dead-lettering from
        # one level to the next holds a message in both for a moment)
        waiting = -1
        for _ in range(20):
            depths = await curves.queue_depths(url, [*levels, *others])
            now_waiting = sum(depths[q] for q in levels) + sum(
                d for q, d in depths.items() if q in others and not q.startswith("dlq.")
            )
            if now_waiting == waiting and volume.count + waiting == n:
                break
            waiting = now_waiting
            await asyncio.sleep(0.3)
        dead = {q: d for q, d in depths.items() if q.startswith("dlq.") and d}
        curves.check(not dead, f"dead-lettered: {dead}")
        curves.check(
            volume.count + waiting == n,
            f"volume: {volume.count} handled + {waiting} waiting != {n} published",
        )
        in_levels = n - handled_at_mem1

        def per_msg(before: float, after: float) -> float:
            # below zero: the shared broker freed more meanwhile than these messages took
            return (after - before) / in_levels if after > before else float("nan")

        return {
            "events": n,
            "body_bytes": body_bytes,
            "publish_msgs_s": n / (t1 - t0),
            "publish_cpu_us": (cpu1 - cpu0) / n * 1e6,
            "waiting_at_end": waiting,
            "volume_handled": volume.count,
            "mem_bytes_per_msg": per_msg(mem0["erlang"], mem1["erlang"]),
            "quorum_ets_bytes_per_msg": per_msg(mem0["quorum_ets"], mem1["quorum_ets"]),
            "binary_bytes_per_msg": per_msg(mem0["binary"], mem1["binary"]),
            "queue_procs_bytes_per_msg": per_msg(vhost0["memory"], vhost1["memory"]),
            "broker_mem_before_mb": mem0["erlang"] / 1e6,
            "broker_mem_after_mb": mem1["erlang"] / 1e6,
            "sample": samples,
            "late_p50_ms": percentile(lateness, 0.50) * 1000,
            "late_p95_ms": percentile(lateness, 0.95) * 1000,
            "late_p99_ms": percentile(lateness, 0.99) * 1000,
            "late_max_ms": max(lateness) * 1000,
        }


async def measure_async(url: str, quick: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    volumes, samples = ((QUICK_VOLUME,), 20) if quick else (VOLUMES, 200)
    for n in volumes:
        head = {"spread": "after= spread over 1 h", "events_in_flight": n}
        await curves.run_point(rows, head, partial(point, url, n, samples, quick))
    plot = {"series": "spread", "logx": True}
    return {
        "key": "delays",
        "title": TITLE,
        "x": "events_in_flight",
        "xlabel": "delayed events published (waiting up to 1 h, log scale)",
        "plots": [
            {**plot, "y": "publish_msgs_s", "label": "publish rate with after= (msg/s)"},
            {
                **plot,
                "y": "mem_bytes_per_msg",
                "logy": True,
                "lines": {
                    "mem_bytes_per_msg": "node: all memory (erlang)",
                    "quorum_ets_bytes_per_msg": "node: quorum queues' ETS",
                    "queue_procs_bytes_per_msg": "its vhost's queue processes",
                },
                "label": "broker memory per waiting message (bytes, log scale)",
                "legend": "",
            },
            {
                **plot,
                "y": "late_p99_ms",
                "lines": {
                    "late_p50_ms": "p50",
                    "late_p95_ms": "p95",
                    "late_p99_ms": "p99",
                    "late_max_ms": "max",
                },
                "label": "lateness of 1-10 s delays (ms)",
                "legend": "sample of short delays",
            },
        ],
        "rows": rows,
    }


def measure(url: str, quick: bool) -> dict[str, Any]:
    return curves.finish(asyncio.run(measure_async(url, quick)))
