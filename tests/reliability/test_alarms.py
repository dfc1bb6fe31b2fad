"""Scenario 10: memory and disk alarms on the broker while a group consumes and a publisher
publishes confirmed events.

RabbitMQ under a resource alarm stops reading from every connection that publishes:
publishes are neither refused nor confirmed, they wait. The bus bounds that wait with
``publish_timeout`` (2 s here): a publish the broker has not confirmed by then raises
``PublishError`` -- it never reports success -- and the harness's publisher retries the
same number. Connections that only consume are not blocked: a backlog queued before the
alarm keeps being handled while it is raised.

Each alarm is raised for ALARM_HOLD s on the shared broker (``set_vm_memory_high_watermark
0``; ``set_disk_free_limit`` above the free disk), then the limit read before is put back
exactly (:mod:`tests.reliability.rabbitmq_admin`) and the test asserts it is. Both monitors
re-check at once when a limit is set, so the alarm shows in ``rabbit_alarm:get_alarms()`` by
the time the command returns; the times below are when a poll of it first saw the alarm
raised / cleared (a poll takes ~0.5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

from banyan_bus import MessageBus
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
from tests.reliability.rabbitmq_admin import (
    DISK,
    MEMORY,
    alarms,
    disk_free,
    disk_free_limit,
    memory_watermark,
    rabbitmqctl,
)

pytestmark = [pytest.mark.reliability, pytest.mark.amqp]

PUBLISH_TIMEOUT = 2.0  # the publisher bus's publish_timeout
ALARM_HOLD = 4.0  # s each alarm stays raised (from when it is seen)
RATE = 30.0  # the steady publisher, events/s (below what the group handles)
BURST = 250  # published at full speed just before each alarm: the backlog handled during it
CONCURRENCY = 2
HANDLER_DELAY = 0.02  # so the group handles ~100/s and a burst takes seconds
PREFETCH = 3 * CONCURRENCY
BURST_BASE = 1_000_000  # burst numbers: BURST_BASE + 1000 x alarm + i


@dataclass
class Alarm:
    kind: str
    commanded: float = 0.0  # wall clock: the raise command started
    raised: float = 0.0  # first seen raised
    clearing: float = 0.0  # the restore command started
    cleared: float = 0.0  # first seen cleared
    backlog: int = 0  # burst events confirmed and not yet handled when seen raised


@dataclass
class Attempt:
    start: float
    end: float
    error: str | None  # exception type; None: confirmed


class TimedBus(MessageBus):
    """A publisher bus that notes every publish attempt: when, how long, how it ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[Attempt] = []

    async def publish(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        start = time.time()
        try:
            message_id: str = await super().publish(*args, **kwargs)
        except BaseException as exc:
            self.attempts.append(Attempt(start, time.time(), type(exc).__name__))
            raise
        self.attempts.append(Attempt(start, time.time(), None))
        return message_id


async def _wait_alarm(kind: str, raised: bool, within: float = 20.0) -> float:
    """Poll the broker's alarms until ``kind`` is (not) raised; the time a poll saw it."""
    deadline = time.monotonic() + within
    while (kind in await asyncio.to_thread(alarms)) != raised:
        if time.monotonic() > deadline:
            state = "raised" if raised else "cleared"
            raise AssertionError(f"the {kind} alarm was not {state} within {within} s")
        await asyncio.sleep(0.05)
    return time.time()


async def _hold_alarm(
    alarm: Alarm, raise_args: list[str], restore_args: list[str], gate: asyncio.Event
) -> None:
    """Raise the alarm; once it is seen raised, open ``gate`` (the handlers' backlog goes
    on) and hold it for ALARM_HOLD s; put the limit back, wait until it is seen cleared."""
    alarm.commanded = time.time()
    try:
        await asyncio.to_thread(rabbitmqctl, *raise_args)
        alarm.raised = await _wait_alarm(alarm.kind, raised=True)
        gate.set()
        await asyncio.sleep(ALARM_HOLD)
    finally:
        gate.set()
        alarm.clearing = time.time()
        await asyncio.to_thread(rabbitmqctl, *restore_args)
    alarm.cleared = await _wait_alarm(alarm.kind, raised=False)


@dataclass
class Limits:
    watermark: list[str]
    disk_bytes: int
    disk_args: list[str]
    problems: list[str] = field(default_factory=list)

    def restore(self) -> None:
        """Put both limits back; note (and fix) any that were not."""
        if memory_watermark() != self.watermark:
            self.problems.append(f"memory watermark was {memory_watermark()}")
        rabbitmqctl("set_vm_memory_high_watermark", *self.watermark)
        if disk_free_limit()[0] != self.disk_bytes:
            self.problems.append(f"disk free limit was {disk_free_limit()[0]}")
        rabbitmqctl("set_disk_free_limit", *self.disk_args)


@pytest.fixture
def broker_limits() -> Iterator[Limits]:
    """The broker's memory watermark and disk free limit as found; put back at teardown
    whatever happened in the test (the test puts them back itself and asserts it)."""
    raised = alarms()
    if raised:
        pytest.fail(f"the shared broker already has alarms raised: {sorted(raised)}")
    disk_bytes, disk_args = disk_free_limit()
    limits = Limits(memory_watermark(), disk_bytes, disk_args)
    yield limits
    limits.restore()
    assert memory_watermark() == limits.watermark
    assert disk_free_limit()[0] == limits.disk_bytes
    assert not limits.problems, f"a limit was not restored by the test: {limits.problems}"


def _in(t: float, start: float, end: float) -> bool:
    return start <= t <= end


@pytest.mark.timeout(150)
async def test_memory_and_disk_alarms(amqp_url: str, unique, broker_limits: Limits) -> None:
    """A steady publisher (30/s, ``publish_timeout`` 2 s) and a group (concurrency 2, 0.02 s
    handlers); before each alarm a burst of 250 events queues a backlog (the handlers wait
    from the burst until the alarm is seen raised, so it is still queued then). A memory
    alarm, then a disk alarm, each raised for 4 s.

    Asserts, per alarm: the publisher blocked (no publish confirmed while it was raised)
    and its attempts raised ``PublishError`` after ``publish_timeout`` (and were retried);
    the group went on handling the backlog during the alarm; publishing resumed after it
    cleared. Over the run: nothing confirmed lost; no failure outside an alarm; duplicates
    at most one per failed publish attempt (a blocked frame is still read and routed once
    the alarm clears, and the retry is another copy: the consumer is never touched, so
    nothing else can double). The limits are back as found.
    """
    began = time.monotonic()
    rss0 = rss_kib()
    limits = broker_limits
    disk_trigger = str(max(2 * disk_free(), 10**12))  # at least 1000 GB, above the free disk
    rec = Recorder(unique("run"))
    group = unique("rel-alarm")
    record = rec.handler(group)

    # Closed before each burst, opened once the alarm is seen raised: the burst is still
    # queued then, however long rabbitmqctl takes on a loaded machine.
    gate = asyncio.Event()
    gate.set()

    async def handle(event: ReliabilityTicked) -> None:
        await gate.wait()
        await asyncio.sleep(HANDLER_DELAY)
        await record(event)

    stats = PublishStats()
    plan = [
        (
            Alarm(MEMORY),
            ["set_vm_memory_high_watermark", "0"],
            ["set_vm_memory_high_watermark", *limits.watermark],
        ),
        (
            Alarm(DISK),
            ["set_disk_free_limit", disk_trigger],
            ["set_disk_free_limit", *limits.disk_args],
        ),
    ]
    publisher: TimedBus
    stopped_steady = 0.0
    try:
        async with AsyncExitStack() as stack:
            consumer = MessageBus(group, amqp_url, grace_period=2.0)
            await consumer.subscribe(
                ReliabilityTicked, handle, concurrency=CONCURRENCY, prefetch=PREFETCH, timeout=60
            )
            await stack.enter_async_context(consumer)
            publisher = TimedBus(
                unique("rel-pub"), amqp_url, publish_timeout=PUBLISH_TIMEOUT, grace_period=2.0
            )
            await stack.enter_async_context(publisher)
            steady = asyncio.create_task(
                publish_numbered(publisher, rec.run, range(BURST_BASE), stats, rate=RATE)
            )
            try:
                for i, (alarm, raise_args, restore_args) in enumerate(plan):
                    await asyncio.wait({steady}, timeout=3.0)
                    assert not steady.done(), f"the steady publisher stopped: {steady}"
                    first = BURST_BASE + 1000 * i
                    burst = range(first, first + BURST)
                    gate.clear()
                    await publish_numbered(publisher, rec.run, burst, stats, rate=1e6)
                    await _hold_alarm(alarm, raise_args, restore_args, gate)
                    handled = {n for n, t in rec.handled.get(group, []) if t <= alarm.raised}
                    alarm.backlog = len(set(burst) - handled)
                await asyncio.wait({steady}, timeout=3.0)
                assert not steady.done(), f"the steady publisher stopped: {steady}"
            finally:
                steady.cancel()  # it stops between numbers or mid-attempt: never confirmed
                stopped_steady = time.time()
                # Python 3.11's asyncio.wait_for can swallow a cancellation that arrives as
                # the publish it waits for completes: the publisher then goes on for ever
                # (a CI run here hung on it). Cancel again until it has stopped.
                while not steady.done():
                    await asyncio.wait({steady}, timeout=1.0)
                    steady.cancel()
                await asyncio.gather(steady, return_exceptions=True)
            complete = await wait_all_handled(stats, lambda: rec.handled, [group], timeout=60)
            await asyncio.sleep(1.0)  # late duplicates show now
    finally:
        await asyncio.to_thread(limits.restore)
    # The limits are back as found, and no alarm is left raised.
    assert memory_watermark() == limits.watermark
    assert disk_free_limit() == (limits.disk_bytes, limits.disk_args)
    assert not alarms(), f"alarms left raised: {alarms()}"
    assert not limits.problems, limits.problems

    attempts = publisher.attempts
    records = rec.handled.get(group, [])
    per_alarm: list[dict[str, Any]] = []
    problems: list[str] = [] if complete else ["not all handled within 60 s"]
    for alarm, _, _ in plan:
        # Failed attempts this alarm caused: ended after it was raised, began before it
        # cleared (an attempt begun while raised waits out its timeout).
        failed = [
            a for a in attempts if a.error and a.end >= alarm.commanded and a.start <= alarm.cleared
        ]
        confirmed_inside = [
            a for a in attempts if a.error is None and _in(a.end, alarm.raised, alarm.clearing)
        ]
        # The broker stops reading a connection at its first publish after the alarm (that
        # one is still routed): with a steady publisher, within ~1/RATE s of the raise.
        confirmed_before_seen = [
            a for a in attempts if a.error is None and _in(a.end, alarm.commanded, alarm.raised)
        ]
        after = [a.end for a in attempts if a.error is None and a.end > alarm.clearing]
        resumed = min(after) - alarm.clearing if after else None
        handled_inside = sum(1 for _, t in records if _in(t, alarm.raised, alarm.clearing))
        figures = {
            "kind": alarm.kind,
            "raised seen (s after the command)": round(alarm.raised - alarm.commanded, 2),
            "raised for (s, seen raised .. restore command)": round(
                alarm.clearing - alarm.raised, 2
            ),
            "cleared seen (s after the restore command)": round(alarm.cleared - alarm.clearing, 2),
            "publishes that raised": f"{len(failed)} {sorted({a.error for a in failed})}",
            "their durations (s)": sorted({round(a.end - a.start, 2) for a in failed}),
            "publishes confirmed while raised": len(confirmed_inside),
            "confirmed between the command and the alarm seen": len(confirmed_before_seen),
            "backlog queued when raised": alarm.backlog,
            "handlings while raised": handled_inside,
            "first confirm after the restore command (s)": (
                "none" if resumed is None else round(resumed, 2)
            ),
        }
        per_alarm.append(figures)
        name = f"{alarm.kind} alarm"
        if not failed:
            problems.append(f"{name}: no publish raised (the publisher did not block)")
        if any(a.error != "PublishError" for a in failed):
            problems.append(f"{name}: a publish failed otherwise than with PublishError: {failed}")
        slow = PUBLISH_TIMEOUT + 2
        if any(not PUBLISH_TIMEOUT - 0.05 <= a.end - a.start <= slow for a in failed):
            problems.append(f"{name}: a publish did not raise after publish_timeout: {failed}")
        if confirmed_inside:
            problems.append(f"{name}: {len(confirmed_inside)} publishes confirmed while raised")
        if handled_inside == 0:
            problems.append(f"{name}: the group handled nothing while the alarm was raised")
        if resumed is None or resumed > PUBLISH_TIMEOUT + 5:
            problems.append(f"{name}: publishing did not resume within 7 s of the clear")
    windows = [(a.commanded, a.cleared + PUBLISH_TIMEOUT + 1) for a, _, _ in plan]
    stray = [
        a
        for a in attempts
        if a.error and a.end < stopped_steady and not any(_in(a.end, *w) for w in windows)
    ]
    if stray:
        problems.append(f"{len(stray)} publishes failed outside the alarms: {stray[:3]}")

    bound = DupBound(publish_retries=stats.retries)
    outcome = analyse(
        stats, rec.handled, groups=[group], faults=[a.raised for a, _, _ in plan], bound=bound
    )
    result = verdict(outcome, problems)
    rows = common_rows(stats, outcome, len(plan), time.monotonic() - began)
    rows["recovery after each fault (s)"] = (
        ", ".join(
            f"{f['kind']}: {f['first confirm after the restore command (s)']}" for f in per_alarm
        )
        + " (first publish confirmed after the restore command)"
    )
    rows["handling pause after each alarm (s)"] = ", ".join(
        "-" if p is None else f"{p:.2f}" for p in outcome.fault_pauses
    )
    for figures in per_alarm:
        kind = figures.pop("kind")
        rows[f"{kind} alarm"] = "; ".join(f"{k}: {v}" for k, v in figures.items())
    rows["publisher / group"] = (
        f"steady {RATE:.0f}/s + a burst of {BURST} before each alarm, publish_timeout "
        f"{PUBLISH_TIMEOUT} s / concurrency {CONCURRENCY}, prefetch {PREFETCH}, "
        f"handler {HANDLER_DELAY} s"
    )
    rows["limits restored (memory watermark / disk free limit)"] = (
        f"{' '.join(limits.watermark)} / {' '.join(limits.disk_args)} (disk alarm set with "
        f"{disk_trigger} bytes)"
    )
    rows[RSS_ROW] = fmt_rss(rss0, rss_kib())
    rows["result"] = result
    write_results("10-alarms", "10. Memory and disk alarms (4 s each)", rows)
    assert not problems, result
    assert_outcome(outcome, "alarms")
