"""Scenario 8: an ordered subscription under faults: per-key order across connection kills and
a consumer SIGKILL.

Two consumer processes (``consumer_proc.py --ordered``) of one group share the group's
partition queues (single active consumer per queue: one handles, the other stands by). The
publisher gives each event the partition key ``k<n % KEYS>`` and publishes one number after
another, so each key's publish order is its numbers in order. Every handling of every key is
checked against it (``harness.check_order``): each is the key's next event, or a replay after
a fault that rewinds to an event already handled and goes on from there in order.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from banyan_bus import MessageBus
from tests.brokers import close_connections, list_connections, vhost_from_url
from tests.reliability.harness import (
    RSS_ROW,
    ConsumerProc,
    DupBound,
    PublishStats,
    analyse,
    assert_outcome,
    check_order,
    common_rows,
    fmt_rss,
    publish_numbered,
    unfinished,
    verdict,
    wait_all_handled,
    write_results,
)

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

KEYS = 16
PARTITIONS = 4
CONCURRENCY = 10
PREFETCH = 3 * CONCURRENCY  # per partition queue (the stream's prefetch)
COUNT = 2000
RATE = 100.0


def key_of(n: int) -> str:
    return f"k{n % KEYS}"


async def _await_connections(vhost: str, count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(await asyncio.to_thread(list_connections, vhost)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} clients not reconnected to {vhost} in {within} s")
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_ordered_subscription_keeps_per_key_order_under_faults(
    amqp_url: str, unique, tmp_path
) -> None:
    """2000 events over 16 keys at 100/s, handlers of 0.05 s. Faults: the vhost's
    connections closed at ~3 s and ~6 s, the consumer process that handled last SIGKILLed
    at ~9 s (a replacement starts 1 s later), the connections closed again at ~12 s.

    Asserts: nothing lost; no key's order ever violated; handlers were running in the
    killed process; duplicates at most 4 faults x 120 (one active consumer per partition
    queue holds at most prefetch 30 x 4 queues unacked) + failed publishes.
    """
    began = time.monotonic()
    vhost = vhost_from_url(amqp_url)
    group, run = unique("rel-ordered"), unique("run")
    opts = {
        "concurrency": CONCURRENCY,
        "prefetch": PREFETCH,
        "delay": 0.05,
        "ordered": True,
        "partitions": PARTITIONS,
    }
    procs = [ConsumerProc(tmp_path, amqp_url, group, run, tag, **opts) for tag in ("a", "b")]
    stats = PublishStats()
    faults: list[float] = []
    kinds: list[str] = []
    killed: ConsumerProc | None = None
    running_at_kill: list[int] = []
    rss_start = 0
    rss_end = 0
    try:
        for proc in procs:
            await proc.wait_ready()
        rss_start = procs[0].rss_kib()
        async with MessageBus(unique("rel-pub"), amqp_url, grace_period=2.0) as publisher:
            pub = asyncio.create_task(
                publish_numbered(publisher, run, range(COUNT), stats, rate=RATE, key=key_of)
            )
            try:
                for step, kind in enumerate(("close", "close", "kill", "close")):
                    await asyncio.wait({pub}, timeout=3.0)
                    assert not pub.done(), f"publisher finished before fault {step + 1}"
                    live = [p for p in procs if p.proc.poll() is None]
                    await _await_connections(vhost, len(live) + 1)
                    faults.append(time.time())
                    kinds.append(kind)
                    if kind == "close":
                        await asyncio.to_thread(close_connections, vhost)
                        continue
                    # The process that handled last is the active one (of most queues).
                    killed = max(live, key=lambda p: max((t for _, t in p.handled()), default=0))
                    killed.kill()
                    running_at_kill = unfinished(killed, since=faults[-2])
                    await asyncio.sleep(1.0)
                    replacement = ConsumerProc(tmp_path, amqp_url, group, run, "c", **opts)
                    procs.append(replacement)
                    await replacement.wait_ready()
                await asyncio.wait_for(pub, timeout=120)
            finally:
                pub.cancel()

        def handled() -> dict[str, list[tuple[int, float]]]:
            return {group: [h for p in procs for h in p.handled()]}

        complete = await wait_all_handled(stats, handled, [group], timeout=60)
        await asyncio.sleep(1.0)
        records = handled()
        rss_end = procs[-1].rss_kib()
    finally:
        for proc in procs:
            await proc.stop()
    order = check_order(records[group], key_of, stats.attempted)
    bound = DupBound(
        in_flight=PREFETCH * PARTITIONS, faults=len(faults), publish_retries=stats.retries
    )
    outcome = analyse(stats, records, groups=[group], faults=faults, bound=bound)
    problems = [] if complete else ["not all handled within 60 s"]
    if order.violations:
        problems.append(f"{len(order.violations)} order violations: {order.violations[:3]}")
    if not running_at_kill:
        problems.append("no handler was running at the kill")
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["faults (in order)"] = ", ".join(kinds)
    rows["keys / partition queues / consumer processes"] = (
        f"{KEYS} / {PARTITIONS} / {len(procs)} (2 at a time)"
    )
    rows["handlings checked for order (keys)"] = f"{order.events} ({order.keys})"
    rows["order violations"] = len(order.violations)
    rows["replays (rewinds to an already handled event)"] = order.rewinds
    rows["handlers started and unfinished at the kill"] = len(running_at_kill)
    rows["handled per process"] = {p.out.stem: len(p.handled()) for p in procs}
    rows[RSS_ROW] = fmt_rss(rss_start, rss_end, "first consumer / replacement")
    rows["result"] = result
    write_results("8-ordered-faults", "8. Ordered subscription under faults", rows)
    assert killed is not None
    assert not order.violations, result
    assert order.keys == KEYS, f"only {order.keys} keys handled"
    assert running_at_kill, "no handler was started and unfinished at the kill"
    assert_outcome(outcome, "ordered under faults")
    assert complete, result
