"""Scenario 7: a client-broker partition (half-open TCP: no FIN, no RST) for 30 s.

The publisher and the consumer both reach the (shared) broker through ``tests/proxies.py``'s
``BrokerProxy``; ``blackhole()`` swallows every byte both ways while the sockets stay open,
``heal()`` drops the connections that lived through it and forwards again. Only the
heartbeat can notice: aiormq gives up after ``(heartbeat + 1) x 3`` s without a frame,
checked every ``heartbeat / 2`` s (default heartbeat 8 s: ~27-31 s).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from banyan_bus import MessageBus
from banyan_bus.transport.amqp_connection import DEFAULT_HEARTBEAT
from tests.proxies import BrokerProxy
from tests.reliability.harness import (
    RSS_ROW,
    DupBound,
    PublishStats,
    Recorder,
    ReliabilityTicked,
    analyse,
    assert_outcome,
    common_rows,
    fmt_rss,
    publish_numbered,
    rss_kib,
    verdict,
    wait_all_handled,
    write_results,
)

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

BLACKHOLE_S = 30.0
DETECTION_BOUND_S = (DEFAULT_HEARTBEAT + 1) * 3 + DEFAULT_HEARTBEAT / 2 + 5
PUBLISH_TIMEOUT_S = 5.0  # the bus's publish_timeout: an unconfirmed publish raises after it
CONCURRENCY = 10
PREFETCH = 3 * CONCURRENCY
CONFIRM_SLACK_S = 0.5  # a confirm already on its way when the blackhole began


@pytest.mark.timeout(180)
async def test_client_broker_partition_blackholed_for_30_s(amqp_url: str, unique) -> None:
    """600 events at 20/s from a publisher to one consumer group, both through the proxy;
    3 s in, the proxy blackholes every connection for 30 s (longer if a client has not
    noticed yet, up to the detection bound), then heals.

    Asserts: both clients notice within the bound (reported); no publish is confirmed
    while the partition lasts and the publishes in flight raise (``publish_timeout``),
    then are retried; nothing confirmed is lost; the consumer resumes after the heal.
    Duplicates: the partition hits the consumer once (its <= 30 unacked deliveries, whose
    acks the blackhole swallowed) plus one copy per failed publish attempt.
    """
    began = time.monotonic()
    rss0 = rss_kib()
    rec = Recorder(unique("run"))
    group = unique("rel-partition")
    stats = PublishStats()
    lost_at: dict[str, float] = {}
    blackholed_wall = healed_wall = 0.0
    blackhole_s = 0.0
    async with BrokerProxy() as proxy:
        url = proxy.url(amqp_url)
        consumer = MessageBus(group, url, grace_period=2.0, publish_timeout=PUBLISH_TIMEOUT_S)
        await consumer.subscribe(
            ReliabilityTicked, rec.handler(group), concurrency=CONCURRENCY, prefetch=PREFETCH
        )
        publisher = MessageBus(
            unique("rel-pub"), url, grace_period=2.0, publish_timeout=PUBLISH_TIMEOUT_S
        )
        async with consumer, publisher:
            for name, bus in (("consumer", consumer), ("publisher", publisher)):
                bus.transport.on_connection_lost(
                    lambda name=name: lost_at.setdefault(name, time.monotonic())
                )
            pub = asyncio.create_task(
                publish_numbered(publisher, rec.run, range(600), stats, rate=20)
            )
            try:
                await asyncio.wait({pub}, timeout=3.0)
                assert not pub.done(), "publisher finished before the partition"
                assert not lost_at, f"a connection dropped before the partition: {lost_at}"
                failures_before = stats.retries
                blackholed_wall = time.time()
                proxy.blackhole()
                t0 = proxy.blackholed_at or time.monotonic()
                while time.monotonic() - t0 < BLACKHOLE_S or (
                    len(lost_at) < 2 and time.monotonic() - t0 < DETECTION_BOUND_S
                ):
                    await asyncio.sleep(0.2)
                blackhole_s = time.monotonic() - t0
                failures_during = stats.retries - failures_before
                healed_wall = time.time()
                proxy.heal()
                await asyncio.wait_for(pub, timeout=120)
            finally:
                pub.cancel()
            complete = await wait_all_handled(stats, lambda: rec.handled, [group], timeout=60)
            await asyncio.sleep(1.0)
    detected = {name: round(at - t0, 1) for name, at in lost_at.items()}
    confirmed_in_partition = sorted(
        n
        for n, at in stats.confirmed_at.items()
        if blackholed_wall + CONFIRM_SLACK_S < at < healed_wall
    )
    after_heal = sorted(t for _, t in rec.handled.get(group, []) if t > healed_wall)
    resumed_s = after_heal[0] - healed_wall if after_heal else None
    bound = DupBound(in_flight=PREFETCH, faults=1, publish_retries=stats.retries)
    outcome = analyse(stats, rec.handled, groups=[group], faults=[blackholed_wall], bound=bound)
    problems = [] if complete else ["not all handled within 60 s"]
    late = {n: s for n, s in detected.items() if s > DETECTION_BOUND_S}
    if len(detected) < 2 or late:
        problems.append(f"partition not noticed by both within {DETECTION_BOUND_S:.0f} s")
    if confirmed_in_partition:
        problems.append(f"confirmed during the partition: {confirmed_in_partition[:10]}")
    if not failures_during:
        problems.append("no publish raised during the partition")
    if resumed_s is None:
        problems.append("nothing handled after the heal")
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, 1, time.monotonic() - began)
    rows["blackhole (s)"] = f"{blackhole_s:.1f}"
    rows["partition noticed after (s; bound)"] = f"{detected} ({DETECTION_BOUND_S:.0f})"
    rows["publish attempts that raised during the partition"] = failures_during
    rows["confirmed during the partition"] = len(confirmed_in_partition)
    rows["bytes swallowed by the blackhole"] = proxy.dropped_bytes
    rows["first event handled after the heal (s)"] = (
        "none" if resumed_s is None else f"{resumed_s:.2f}"
    )
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("7-client-partition", "7. Client-broker partition (30 s blackhole)", rows)
    assert set(detected) == {"consumer", "publisher"}, f"not noticed by both: {detected}"
    assert not late, f"noticed too late (bound {DETECTION_BOUND_S:.0f} s): {detected}"
    assert not confirmed_in_partition, result
    assert failures_during > 0, "no publish raised during the partition"
    assert resumed_s is not None, "the consumer did not resume after the heal"
    assert_outcome(outcome, "client partition")
    assert complete, result
