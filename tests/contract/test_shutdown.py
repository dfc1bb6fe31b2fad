"""A bounded shutdown (issue 16 §4), on memory:// and amqp://.

``bus.stop(grace_period=g)`` returns within ``g`` + a small constant whatever handlers do:
a handler that catches ``CancelledError`` and goes on (past its ``timeout`` or the grace
period) is abandoned and its message returned; deliveries whose handler never started
(prefetched, waiting for a concurrency slot) go back at once instead of being run first.
Nothing is lost: a second instance of the group handles every message.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
import structlog

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy
from tests.support import wait_until

NO_RETRY = RetryPolicy(immediate=0, delayed=0)
#: What stop() may take beyond its grace period (the issue's bound).
SLACK_S = 2.0


class KilnFired(Event):
    kiln_id: str


async def _drain(group: str, url: str, expected: int, timeout: float = 20) -> Counter[str]:
    """Run a second instance of the group until it has handled ``expected`` messages."""
    handled: Counter[str] = Counter()

    async def handle(event: KilnFired) -> None:
        handled[event.kiln_id] += 1

    bus = MessageBus(group, url, retry=NO_RETRY)
    await bus.subscribe(KilnFired, handle)
    async with bus:
        await wait_until(lambda: sum(handled.values()) >= expected, timeout=timeout)
        await asyncio.sleep(0.3)  # nothing more arrives
    return handled


@pytest.mark.parametrize("timeout", [1.0, None], ids=["past-its-timeout", "no-timeout"])
async def test_stop_is_bounded_when_a_handler_ignores_cancellation(
    bus_url: str, unique: Callable[[str], str], timeout: float | None
) -> None:
    started: list[str] = []
    release = asyncio.Event()
    stubborn_ended = 0

    async def stubborn(event: KilnFired, ctx: MessageContext) -> None:
        nonlocal stubborn_ended
        started.append(event.kiln_id)
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:  # deliberately ignored
                continue
        stubborn_ended += 1

    group = unique("kiln")
    bus = MessageBus(group, bus_url, retry=NO_RETRY)
    await bus.subscribe(KilnFired, stubborn, concurrency=3, timeout=timeout)
    with structlog.testing.capture_logs() as logs:
        await bus.start()
        try:
            for i in range(3):
                await bus.publish(KilnFired(kiln_id=f"k{i}"))
            await wait_until(lambda: len(started) == 3, timeout=10)
            if timeout is not None:
                await asyncio.sleep(timeout + 0.2)  # past the handlers' deadline, ignored
            began = time.monotonic()
            await bus.stop(grace_period=1)
            took = time.monotonic() - began
        finally:
            release.set()  # let the abandoned handlers end, so the loop can close
            await bus.stop(grace_period=0)
    print(f"stop(grace_period=1) with 3 cancellation-ignoring handlers took {took:.2f} s")
    assert took < 1 + SLACK_S, took
    abandoned = [e for e in logs if e.get("event") == "handler_abandoned"]
    assert sorted(e["message_id"] is not None for e in abandoned) == [True] * 3, abandoned
    assert {e["handler"] for e in abandoned} == {f"{stubborn.__module__}.{stubborn.__qualname__}"}
    await wait_until(lambda: stubborn_ended == 3, timeout=5)
    # None lost: another instance gets all three.
    handled = await _drain(group, bus_url, expected=3)
    assert set(handled) == {"k0", "k1", "k2"}, handled


async def test_stop_returns_unstarted_prefetched_deliveries_at_once(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    total = 30
    handled_first: list[str] = []

    async def slow(event: KilnFired) -> None:
        await asyncio.sleep(0.3)
        handled_first.append(event.kiln_id)

    group = unique("kiln")
    bus = MessageBus(group, bus_url, retry=NO_RETRY)
    sub = await bus.subscribe(KilnFired, slow, concurrency=1, prefetch=30)
    async with bus:
        for i in range(total):
            await bus.publish(KilnFired(kiln_id=f"k{i}"))

        async def prefetched() -> bool:
            state = await bus.transport.queue_state(sub.queue_name)
            return state is not None and state.messages == 0

        for _ in range(200):  # all 30 delivered to this consumer (unacked), one running
            if await prefetched():
                break
            await asyncio.sleep(0.05)
        began = time.monotonic()
        await bus.stop(grace_period=10)
        took = time.monotonic() - began
    print(
        f"stop(grace_period=10), prefetch 30 / concurrency 1, 0.3 s handlers: {took:.2f} s, "
        f"{len(handled_first)} handled before stopping, {total - len(handled_first)} returned"
    )
    # Before: every prefetched message ran first (30 x 0.3 s = 9 s).
    assert took < 0.3 + SLACK_S, took
    assert len(handled_first) <= 3, handled_first
    handled = await _drain(group, bus_url, expected=total - len(handled_first))
    redelivered = sum(handled.values())
    assert redelivered == total - len(handled_first), (redelivered, handled_first)
    assert set(handled) | set(handled_first) == {f"k{i}" for i in range(total)}
