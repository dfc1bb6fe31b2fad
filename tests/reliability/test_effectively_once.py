"""Scenario 9: effectively-once handling under faults (Redis idempotency, a side effect per event).

A consumer process subscribes with ``idempotent=True`` through ``RedisIdempotencyStore``; its
handler sleeps 0.2 s (the work a kill interrupts), then does its side effect, ``INCR`` of a
counter per event (``<prefix>effect:<n>``). The publisher gives every attempt of a number the
same message id, so even its own retries are the same event. Faults: the vhost's connections
closed twice, then the consumer SIGKILLed mid-handler and a replacement started.

Every counter must end at exactly 1. A killed handler's claim lives until its lease runs out
(``timeout x (1 + immediate) + 30`` = 32 s here); the redelivered event comes back every 5 s
meanwhile and runs once the lease has expired. One window no store outside the side effect's
own transaction can close: a kill after the side effect and before the completion was stored.
Such events are identified from Redis at the kill (effect counter already 1, claim not
``done``), reported, and are the only ones allowed a second effect (expected: none).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from banyan_bus import MessageBus
from tests.brokers import close_connections, list_connections, vhost_from_url
from tests.reliability.consumer_proc import effect_key
from tests.reliability.harness import (
    RSS_ROW,
    ConsumerProc,
    DupBound,
    PublishStats,
    analyse,
    assert_outcome,
    common_rows,
    fmt_rss,
    publish_numbered,
    unfinished,
    verdict,
    wait_all_handled,
    write_results,
)

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

COUNT = 1600
RATE = 80.0
HANDLER_TIMEOUT = 2.0
LEASE_S = HANDLER_TIMEOUT * 1 + 30  # subscription.py: attempt x (1 + immediate) + 30


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _claims(raw: redis.asyncio.Redis, prefix: str, run: str) -> dict[int, str]:
    """Idempotency keys of this run: number -> value ("done" or a live claim's token)."""
    pattern = re.compile(re.escape(run) + r"-(\d+)$")
    keys = [k async for k in raw.scan_iter(match=f"{prefix}idem:*", count=1000)]
    values = await raw.mget(keys) if keys else []
    out: dict[int, str] = {}
    for key, value in zip(keys, values, strict=True):
        m = pattern.search(key)
        if m and value is not None:
            out[int(m.group(1))] = value
    return out


async def _effects(raw: redis.asyncio.Redis, prefix: str, numbers: list[int]) -> dict[int, int]:
    values = await raw.mget([effect_key(prefix, n) for n in numbers]) if numbers else []
    return {n: int(v) for n, v in zip(numbers, values, strict=True) if v is not None}


@pytest.mark.timeout(200)
async def test_effectively_once_under_connection_kills_and_sigkill(
    amqp_url: str, unique, tmp_path, redis_url: str, redis_prefix: str, raw
) -> None:
    """1600 events at 80/s; connections closed at ~2.5 s and ~5 s, the consumer SIGKILLed
    at ~7.5 s (0.2 s handlers, concurrency 20: ~16 running), a replacement 1 s later.

    Asserts: every confirmed event's side effect happened (nothing lost), none twice
    outside the kill window described above, handlers were running under a claim at the
    kill, and every claim ends ``done``."""
    began = time.monotonic()
    vhost = vhost_from_url(amqp_url)
    group, run = unique("rel-once"), unique("run")

    def event_id(n: int) -> str:
        return f"{run}-{n}"

    opts = {
        "concurrency": 20,
        "prefetch": 40,
        "delay": 0.2,
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "timeout": HANDLER_TIMEOUT,
    }
    first = ConsumerProc(tmp_path, amqp_url, group, run, "first", **opts)
    second: ConsumerProc | None = None
    stats = PublishStats()
    faults: list[float] = []
    running_at_kill: list[int] = []
    held_at_kill: list[int] = []
    window: list[int] = []
    rss = (0, 0)
    try:
        await first.wait_ready()
        async with MessageBus(unique("rel-pub"), amqp_url, grace_period=2.0) as publisher:
            pub = asyncio.create_task(
                publish_numbered(
                    publisher,
                    run,
                    range(COUNT),
                    stats,
                    rate=RATE,
                    message_id=lambda n: f"{run}-{n}",
                )
            )
            try:
                for _ in range(2):
                    await asyncio.wait({pub}, timeout=2.5)
                    assert not pub.done(), "publisher finished before the faults"
                    deadline = time.monotonic() + 20
                    while len(await asyncio.to_thread(list_connections, vhost)) < 2:
                        assert time.monotonic() < deadline, "clients did not reconnect"
                        await asyncio.sleep(0.2)
                    faults.append(time.time())
                    await asyncio.to_thread(close_connections, vhost)
                await asyncio.wait({pub}, timeout=2.5)
                assert not pub.done(), "publisher finished before the kill"
                first_rss = first.rss_kib()
                faults.append(time.time())
                first.kill()
                running_at_kill = unfinished(first, since=faults[-2])
                claims = await _claims(raw, redis_prefix, run)
                held_at_kill = sorted(n for n, v in claims.items() if v != "done")
                effects_at_kill = await _effects(raw, redis_prefix, held_at_kill)
                window = sorted(n for n, c in effects_at_kill.items() if c >= 1)
                await asyncio.sleep(1.0)
                second = ConsumerProc(tmp_path, amqp_url, group, run, "second", **opts)
                await second.wait_ready()
                await asyncio.wait_for(pub, timeout=120)
            finally:
                pub.cancel()
        procs = [first, second]

        def handled() -> dict[str, list[tuple[int, float]]]:
            return {group: [h for p in procs if p is not None for h in p.handled()]}

        # The killed handlers' events wait for their leases (32 s) to run out.
        complete = await wait_all_handled(stats, handled, [group], timeout=LEASE_S + 45)
        await asyncio.sleep(6.0)  # a busy event comes back every 5 s: a late double shows now
        records = handled()
        effects = await _effects(raw, redis_prefix, sorted(stats.attempted))
        claims = await _claims(raw, redis_prefix, run)
        rss = (first_rss, second.rss_kib())
    finally:
        if first.proc.poll() is None:
            first.kill()
        if second is not None:
            await second.stop()
    doubled = sorted(n for n, c in effects.items() if c > 1)
    unexplained = sorted(set(doubled) - set(window))
    no_effect = sorted(stats.confirmed - set(effects))
    not_done = sorted(n for n in stats.confirmed if claims.get(n) != "done")
    # Handled records are written after the side effect: a duplicate record is a second
    # side effect, allowed only inside the kill window.
    bound = DupBound(extra=len(window), note="killed between side effect and completion")
    outcome = analyse(stats, records, groups=[group], faults=faults, bound=bound)
    problems = [] if complete else ["not all handled in time"]
    if unexplained:
        problems.append(f"double side effects: {unexplained[:10]}")
    if no_effect:
        problems.append(f"confirmed without a side effect: {no_effect[:10]}")
    if not held_at_kill:
        problems.append("no claim held at the kill")
    if not_done:
        problems.append(f"claims not done at the end: {not_done[:10]}")
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["faults (in order)"] = "close connections, close connections, SIGKILL"
    rows["handlers started and unfinished at the kill"] = len(running_at_kill)
    rows["claims held (not done) at the kill"] = len(held_at_kill)
    rows["killed between side effect and completion (allowed a 2nd effect)"] = len(window)
    rows["events with a side effect (distinct)"] = len(effects)
    rows["double side effects (outside that window)"] = f"{len(doubled)} ({len(unexplained)})"
    rows["handled by the killed process / the replacement"] = (
        f"{len(first.handled())} / {len(second.handled()) if second else 0}"
    )
    interrupted = [
        line[2:]
        for proc in (first, second)
        if proc is not None and proc.starts.exists()
        for line in proc.starts.read_text().splitlines()
        if line.startswith("# ")
    ]
    rows["side effects interrupted by an exception or cancellation"] = (
        f"{len(interrupted)} {interrupted[:5]}" if interrupted else "0"
    )
    rows[RSS_ROW] = fmt_rss(*rss, "killed consumer at the kill / replacement at the end")
    rows["result"] = result
    write_results(
        "9-effectively-once", "9. Effectively-once (Redis idempotency) under faults", rows
    )
    assert running_at_kill, "no handler was started and unfinished at the kill"
    assert held_at_kill, "the kill hit no handler holding a claim"
    assert not unexplained, result
    assert not no_effect, result
    assert not not_done, result
    assert_outcome(outcome, "effectively-once")
    assert complete, result
