"""The ``x-banyan-handled`` header (issue 16 §3): believed on the bus's retry route only.

A retry names the handlers that already succeeded so that they do not run twice. Any
publisher can write that header, though: one that arrives on the root exchange or straight
on the group's exchange (a replay) is ignored and logged, every handler runs, and it does
not ride a retry back in. A DLQ replay runs every handler unless asked to keep progress.
Runs on memory:// and amqp://.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from banyan_bus import Event, MessageBus, RetryPolicy
from banyan_bus.contracts import routing_key_for
from banyan_bus.deadletter import HEADER_HANDLED
from banyan_bus.envelope import HEADER_ATTEMPT, encode
from banyan_bus.topology import ROOT_EXCHANGE
from tests.support import wait_until

ONE_RETRY = RetryPolicy(immediate=0, delayed=1, base=1, jitter=0)
NO_RETRY = RetryPolicy(immediate=0, delayed=0)


class ParcelTagged(Event):
    parcel_id: str


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry.get("event") == event]


async def test_a_forged_header_skips_nothing(bus_url: str, unique: Callable[[str], str]) -> None:
    runs: Counter[tuple[str, str]] = Counter()

    async def audit(event: ParcelTagged) -> None:
        runs["audit", event.parcel_id] += 1

    async def bill(event: ParcelTagged) -> None:
        runs["bill", event.parcel_id] += 1

    group = unique("weigh")
    bus = MessageBus(group, bus_url, retry=NO_RETRY)
    sub = await bus.subscribe(ParcelTagged, audit)
    await bus.subscribe(ParcelTagged, bill)
    forged = {HEADER_HANDLED: [_name(audit), _name(bill)], HEADER_ATTEMPT: 2}
    with structlog.testing.capture_logs() as logs:
        async with bus:
            # On the root exchange, as any publisher can; and straight on the group's exchange.
            for parcel, exchange in (("p-root", ROOT_EXCHANGE), ("p-group", sub.queue_name)):
                message = encode(
                    ParcelTagged(parcel_id=parcel), service_name="forger", headers=dict(forged)
                )
                await bus.transport.publish(
                    exchange, routing_key_for("ParcelTagged"), message, confirm=True
                )
            await wait_until(lambda: len(runs) == 4, timeout=10)
    assert runs == {
        ("audit", "p-root"): 1,
        ("bill", "p-root"): 1,
        ("audit", "p-group"): 1,
        ("bill", "p-group"): 1,
    }
    ignored = _events(logs, "handled_header_ignored")
    assert len(ignored) == 2, ignored
    assert not _events(logs, "handler_skipped")


async def test_a_forged_header_does_not_ride_a_retry(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    """Forged names, first handler fails once: the retry (which takes the believed route)
    must not carry the forged names, so both handlers still run on it."""
    runs: list[str] = []

    async def audit(event: ParcelTagged) -> None:
        runs.append("audit")
        if runs.count("audit") == 1:
            raise RuntimeError("flaky audit")

    async def bill(event: ParcelTagged) -> None:
        runs.append("bill")

    bus = MessageBus(unique("weigh"), bus_url, retry=ONE_RETRY)
    await bus.subscribe(ParcelTagged, audit)
    await bus.subscribe(ParcelTagged, bill)
    async with bus:
        message = encode(
            ParcelTagged(parcel_id="p"),
            service_name="forger",
            headers={HEADER_HANDLED: [_name(audit), _name(bill)]},
        )
        await bus.transport.publish(ROOT_EXCHANGE, "parceltagged", message, confirm=True)
        await wait_until(lambda: "bill" in runs, timeout=10)
    assert runs == ["audit", "audit", "bill"]


async def test_a_genuine_retry_skips_the_handler_that_succeeded(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    runs: list[str] = []

    async def audit(event: ParcelTagged) -> None:
        runs.append("audit")

    async def bill(event: ParcelTagged) -> None:
        runs.append("bill")
        if runs.count("bill") == 1:
            raise RuntimeError("billing down")

    bus = MessageBus(unique("weigh"), bus_url, retry=ONE_RETRY)
    await bus.subscribe(ParcelTagged, audit)
    await bus.subscribe(ParcelTagged, bill)
    with structlog.testing.capture_logs() as logs:
        async with bus:
            await bus.publish(ParcelTagged(parcel_id="p"))
            await wait_until(lambda: runs.count("bill") == 2, timeout=10)
    assert runs == ["audit", "bill", "bill"]
    [skipped] = _events(logs, "handler_skipped")
    assert skipped["handler"] == _name(audit)
    assert skipped["reason"] == "succeeded-before-retry"
    assert skipped["attempt"] == 2
    assert not _events(logs, "handled_header_ignored")


async def test_a_replay_reruns_every_handler_unless_asked_to_keep_progress(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    runs: list[tuple[str, str]] = []
    billing_up = False

    async def audit(event: ParcelTagged) -> None:
        runs.append(("audit", event.parcel_id))

    async def bill(event: ParcelTagged) -> None:
        runs.append(("bill", event.parcel_id))
        if not billing_up:
            raise RuntimeError("billing down")

    group = unique("weigh")
    bus = MessageBus(group, bus_url, retry=NO_RETRY)
    await bus.subscribe(ParcelTagged, audit)
    await bus.subscribe(ParcelTagged, bill)
    async with bus:
        dlq = bus.dlq(group, ParcelTagged)
        first = await bus.publish(ParcelTagged(parcel_id="rerun"))
        second = await bus.publish(ParcelTagged(parcel_id="keep"))

        await wait_until(lambda: len(runs) == 4, timeout=10)
        for _ in range(200):
            if await dlq.count() == 2:
                break
            await asyncio.sleep(0.05)
        records = {dead.ref: dead for dead in await dlq.list()}
        assert records[first].handled == [_name(audit)]
        billing_up = True
        runs.clear()
        result = await dlq.replay(ids=[first])
        assert result.replayed == [first]
        await wait_until(lambda: ("bill", "rerun") in runs, timeout=10)
        result = await dlq.replay(ids=[second], keep_progress=True)
        assert result.replayed == [second]
        await wait_until(lambda: ("bill", "keep") in runs, timeout=10)
    assert sorted(runs) == [("audit", "rerun"), ("bill", "keep"), ("bill", "rerun")]
