"""Scenario 4: a handler that raises in ~20 % of calls, with ``RetryPolicy(immediate=1,
delayed=2, base=1)``: every confirmed event ends handled once successfully or in the DLQ.

Besides the random 20 %, every event with ``n % 50 == 7`` always fails (a poison message),
so the DLQ path is exercised on every run (the random failures alone reach the DLQ with
probability 0.2**4 per event).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from banyan_bus import MessageBus, MessageContext, RetryPolicy
from tests.reliability.harness import (
    RSS_ROW,
    DupBound,
    PublishStats,
    ReliabilityTicked,
    analyse,
    common_rows,
    fmt_rss,
    publish_numbered,
    rss_kib,
    write_results,
)

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

COUNT = 500
POLICY = RetryPolicy(immediate=1, delayed=2, base=1)


def _dead_numbers(records: list) -> list[int]:
    out: list[int] = []
    for dead in records:
        payload = (dead.envelope or {}).get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("n"), int):
            out.append(payload["n"])
    return out


@pytest.mark.timeout(150)
async def test_random_handler_failures_end_handled_or_dead_lettered(amqp_url: str, unique) -> None:
    began = time.monotonic()
    rss0 = rss_kib()
    group, run = unique("rel-flaky"), unique("run")
    rng = random.Random(20)  # a fixed seed: the same failures each run
    calls: Counter[int] = Counter()
    failures: Counter[int] = Counter()
    succeeded: list[tuple[int, float]] = []
    attempts_seen: Counter[int] = Counter()

    async def flaky(event: ReliabilityTicked, ctx: MessageContext) -> None:
        if event.run != run:
            return
        calls[event.n] += 1
        attempts_seen[ctx.attempt] += 1
        if event.n % 50 == 7 or rng.random() < 0.2:
            failures[event.n] += 1
            raise RuntimeError(f"random failure of {event.n}")
        succeeded.append((event.n, time.time()))

    consumer = MessageBus(group, amqp_url, grace_period=2.0)
    await consumer.subscribe(ReliabilityTicked, flaky, retry=POLICY, concurrency=10)
    stats = PublishStats()
    dead: list[int] = []
    async with consumer, MessageBus(unique("rel-pub"), amqp_url) as publisher:
        await asyncio.wait_for(
            publish_numbered(publisher, run, range(COUNT), stats, rate=100), timeout=90
        )
        dlq = consumer.dlq(group, ReliabilityTicked)
        deadline = time.monotonic() + 60
        complete = False
        while time.monotonic() < deadline:
            ok = {n for n, _ in succeeded}
            if len(ok) + await dlq.count() >= len(stats.confirmed):
                dead = _dead_numbers(await dlq.list(limit=COUNT))
                if stats.confirmed <= ok | set(dead):
                    complete = True
                    break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # a late retry or duplicate would show now
        dead = _dead_numbers(await dlq.list(limit=COUNT))
    ok_ids = [n for n, _ in succeeded]
    ok = set(ok_ids)
    both = sorted(ok & set(dead))
    # No fault touches the consumer (a handler exception is an attempt, not a redelivery of a
    # handled event): no event may end both handled and dead-lettered or handled twice,
    # beyond one copy per failed publish attempt (none expected).
    bound = DupBound(publish_retries=stats.retries)
    outcome = analyse(
        stats, {group: succeeded + [(n, 0.0) for n in dead]}, groups=[group], bound=bound
    )
    poison = {n for n in stats.confirmed if n % 50 == 7}
    rows = common_rows(stats, outcome, sum(failures.values()), time.monotonic() - began)
    rows["faults injected"] = f"{sum(failures.values())} handler exceptions"
    rows["events with at least one failure"] = len(failures)
    rows["handled successfully (distinct / calls)"] = f"{len(ok)} / {len(ok_ids)}"
    rows["dead-lettered (of which always-failing)"] = f"{len(dead)} ({len(poison & set(dead))})"
    rows["duplicate successes"] = len(ok_ids) - len(ok)
    rows["both succeeded and dead-lettered"] = len(both)
    rows["handler calls by ctx.attempt"] = dict(sorted(attempts_seen.items()))
    problems = []
    if outcome.lost_total:
        problems.append(f"{outcome.lost_total} lost")
    if both:
        problems.append(f"{len(both)} both succeeded and dead-lettered")
    if not complete:
        problems.append("not all settled within 60 s")
    if outcome.over_bound:
        problems.append(f"duplicates {outcome.duplicates} over the bound {bound.value}")
    if not poison <= set(dead):
        problems.append(f"always-failing events missing from the DLQ: {sorted(poison - set(dead))}")
    rows["result"] = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    del rows["recovery after each fault (s)"]
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    write_results("4-handler-failures", "4. Handler raising in 20 % of calls, with retries", rows)
    assert outcome.lost_total == 0, outcome.lost
    assert not both, f"succeeded and dead-lettered: {both}"
    assert poison <= set(dead), sorted(poison - set(dead))
    assert len(ok_ids) == len(ok), f"duplicate successes: {Counter(ok_ids).most_common(5)}"
    assert not outcome.over_bound, f"duplicates {outcome.duplicates} over the bound {bound}"
    assert complete, rows["result"]
