"""Scenarios 1 and 2: connections closed by the broker mid-stream; broker restart mid-stream.

Two groups get every tick; a bystander group subscribed to another contract must get none.
The publisher retries every publish that raised, so ``confirmed`` holds only confirmed ids.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest

from banyan_bus import MessageBus
from tests.brokers import close_connections, list_connections, vhost_from_url
from tests.reliability.harness import (
    RSS_ROW,
    DupBound,
    PublishStats,
    Recorder,
    ReliabilityBystanderPinged,
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

GROUP_CONCURRENCY = 10
GROUP_PREFETCH = 3 * GROUP_CONCURRENCY  # the default prefetch: unacked per consumer


async def _start_groups(
    stack: AsyncExitStack, url: str, unique, rec: Recorder
) -> tuple[list[str], list[str], MessageBus]:
    groups = [unique("rel-a"), unique("rel-b")]
    for group in groups:
        bus = MessageBus(group, url, grace_period=2.0)
        await bus.subscribe(ReliabilityTicked, rec.handler(group), concurrency=GROUP_CONCURRENCY)
        await stack.enter_async_context(bus)
    bystander_seen: list[str] = []

    async def on_ping(event: ReliabilityBystanderPinged) -> None:
        bystander_seen.append(event.run)

    bystander = MessageBus(unique("rel-bystander"), url, grace_period=2.0)
    await bystander.subscribe(ReliabilityBystanderPinged, on_ping)
    await stack.enter_async_context(bystander)
    publisher = MessageBus(unique("rel-pub"), url, grace_period=2.0)
    await stack.enter_async_context(publisher)
    return groups, bystander_seen, publisher


def _await_connections(vhost: str, count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(list_connections(vhost)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} clients not reconnected to {vhost} in {within} s")
        time.sleep(0.2)


@pytest.mark.timeout(150)
async def test_connections_closed_by_broker_mid_stream(amqp_url: str, unique) -> None:
    """Every ~1.5 s the broker closes every connection of the vhost (publisher's and
    consumers'), 5 times, while 2500 events go out at 100/s (no fault in the last 3 s);
    aio-pika reconnects. Duplicates: each fault closes each group's one consumer, which
    holds at most 30 unacked deliveries (prefetch 3 x concurrency 10)."""
    began = time.monotonic()
    rss0 = rss_kib()
    vhost = vhost_from_url(amqp_url)
    rec = Recorder(unique("run"))
    stats = PublishStats()
    faults: list[float] = []
    closed_counts: list[int] = []
    async with AsyncExitStack() as stack:
        groups, bystander_seen, publisher = await _start_groups(stack, amqp_url, unique, rec)
        pub = asyncio.create_task(
            publish_numbered(publisher, rec.run, range(2500), stats, rate=100)
        )
        try:
            while not pub.done() and len(faults) < 5 and len(stats.attempted) < 2200:
                await asyncio.wait({pub}, timeout=1.5)
                if pub.done():
                    break
                # Wait until all 4 clients (2 groups, bystander, publisher) are back and
                # listed, so each fault really closes the publisher's and consumers' links.
                await asyncio.to_thread(_await_connections, vhost, 4)
                faults.append(time.time())
                closed_counts.append(await asyncio.to_thread(close_connections, vhost))
            await asyncio.wait_for(pub, timeout=120)
        finally:
            pub.cancel()
        complete = await wait_all_handled(stats, lambda: rec.handled, groups, timeout=60)
        await asyncio.sleep(1.0)  # late duplicates show now
    outcome = analyse(
        stats,
        rec.handled,
        groups=groups,
        bystanders={"bystander": len(bystander_seen)},
        faults=faults,
        bound=DupBound(in_flight=GROUP_PREFETCH, faults=len(faults), publish_retries=stats.retries),
    )
    result = verdict(outcome, [] if complete else ["not all handled within 60 s"])
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["connections closed per fault"] = ", ".join(map(str, closed_counts))
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("1-connection-close", "1. Connections closed by the broker mid-stream", rows)
    assert len(faults) >= 3, f"only {len(faults)} faults injected: the run was too short"
    assert all(c >= 1 for c in closed_counts), closed_counts
    assert_outcome(outcome, "connection close")
    assert complete, result


def _rabbitmqctl(*args: str, timeout: float = 120.0) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


@pytest.fixture
def broker_restarted_afterwards() -> Iterator[None]:
    """Belt and braces: whatever happens in the test (a timeout included), start the shared
    broker's app again at teardown (``start_app`` on a running app is a no-op)."""
    yield
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=120, check=False)
    subprocess.run(["rabbitmqctl", "await_startup"], capture_output=True, timeout=180, check=False)


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("broker_restarted_afterwards")
async def test_broker_restart_mid_stream(amqp_url: str, unique) -> None:
    """``rabbitmqctl stop_app`` / ``start_app`` of the (shared) broker while 600 events go out
    at 60/s: quorum queues and persistent messages survive, clients reconnect, consumers
    resume. One restart per run; the broker is always started again (finally). Duplicates:
    the restart closes each group's consumer once (at most its 30 unacked deliveries)."""
    began = time.monotonic()
    rss0 = rss_kib()
    rec = Recorder(unique("run"))
    stats = PublishStats()
    faults: list[float] = []
    downtime = 0.0
    async with AsyncExitStack() as stack:
        groups, bystander_seen, publisher = await _start_groups(stack, amqp_url, unique, rec)
        pub = asyncio.create_task(publish_numbered(publisher, rec.run, range(600), stats, rate=60))
        try:
            await asyncio.wait({pub}, timeout=3.0)
            assert not pub.done(), "publisher finished before the restart"
            faults.append(time.time())
            stopped = time.monotonic()
            try:
                await asyncio.to_thread(_rabbitmqctl, "stop_app")
                await asyncio.sleep(3.0)  # publishes fail and are retried meanwhile
            finally:
                await asyncio.to_thread(_rabbitmqctl, "start_app")
                await asyncio.to_thread(_rabbitmqctl, "await_startup", timeout=180)
                downtime = time.monotonic() - stopped
            await asyncio.wait_for(pub, timeout=150)
        finally:
            pub.cancel()
        complete = await wait_all_handled(stats, lambda: rec.handled, groups, timeout=60)
        await asyncio.sleep(1.0)
    outcome = analyse(
        stats,
        rec.handled,
        groups=groups,
        bystanders={"bystander": len(bystander_seen)},
        faults=faults,
        bound=DupBound(in_flight=GROUP_PREFETCH, faults=len(faults), publish_retries=stats.retries),
    )
    result = verdict(outcome, [] if complete else ["not all handled within 60 s"])
    rows = common_rows(stats, outcome, len(faults), time.monotonic() - began)
    rows["broker down (stop_app .. await_startup done, s)"] = f"{downtime:.1f}"
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("2-broker-restart", "2. Broker restart mid-stream (stop_app/start_app)", rows)
    assert_outcome(outcome, "broker restart")
    assert complete, result
