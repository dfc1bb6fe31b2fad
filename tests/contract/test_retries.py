"""Retries and dead-lettering (issue 4): ``RetryPolicy``, handler ``timeout``, the DLQ record.

Runs on memory:// and amqp://. Delayed retries go through the delay levels (whole seconds) back
to the failing group's own exchange with ``x-attempt`` + 1; immediate retries re-run the handler
on the same delivery; exhausted, refused or timed-out messages land in the group's DLQ with the
``x-banyan-*`` failure details (DESIGN.md §4). Policies use ``jitter=0`` so the schedule is exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from banyan_bus import Event, MessageBus, MessageContext, RetryPolicy
from banyan_bus.consume import Subscription
from banyan_bus.transport.base import Delivery
from tests.support import wait_until

#: The issue's bound for anything delayed: at most this much later than the policy's delay.
LATE_BOUND_S = 1.5


class ChargeAttempted(Event):
    charge_id: str


def _name(fn: Callable[..., Any]) -> str:
    """The handler name the bus records (``x-banyan-handler``): module and qualified name."""
    return f"{fn.__module__}.{fn.__qualname__}"


def _parse_ts(value: object) -> datetime:
    assert isinstance(value, str), value
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _take_dead_letter(bus: MessageBus, sub: Subscription, within: float) -> Delivery:
    """The next message of ``sub``'s DLQ (``basic.get``, unacked), waiting up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        delivery = await bus.transport.get(sub.dlq_name)
        if delivery is not None:
            return delivery
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing reached {sub.dlq_name} within {within} s")
        await asyncio.sleep(0.05)


async def _messages(bus: MessageBus, queue: str) -> int:
    state = await bus.transport.queue_state(queue)
    assert state is not None, f"queue {queue} does not exist"
    return state.messages


async def test_failing_twice_then_succeeding_follows_the_delay_schedule(
    bus_url: str, unique
) -> None:
    """A handler failing twice then succeeding is called 3 times (``ctx.attempt`` 1, 2, 3), the
    calls ~1 s then ~2 s apart as ``RetryPolicy(delayed=3, base=1, factor=2, jitter=0)`` says:
    each gap >= the policy's delay and < delay + 1.5 s. Nothing is left in the queue or DLQ."""
    policy = RetryPolicy(delayed=3, base=1, factor=2, jitter=0)
    calls: list[tuple[float, int, object]] = []

    async def flaky(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append((time.monotonic(), ctx.attempt, ctx.headers.get("x-attempt")))
        if len(calls) <= 2:
            raise RuntimeError(f"transient failure {len(calls)}")

    bus = MessageBus(unique("billing"), bus_url)
    sub = await bus.subscribe(ChargeAttempted, flaky, retry=policy)
    async with bus:
        await bus.publish(ChargeAttempted(charge_id="c-1"))
        budget = sum(policy.delays()[:2]) + 2 * LATE_BOUND_S + 5
        await wait_until(lambda: len(calls) >= 3, timeout=budget, what="3 calls")
        await asyncio.sleep(0.5)  # a 4th call (or a duplicate) would show now
        assert await _messages(bus, sub.queue_name) == 0
        assert await _messages(bus, sub.dlq_name) == 0

    assert [attempt for _, attempt, _ in calls] == [1, 2, 3]
    # Delayed retries are new deliveries carrying x-attempt + 1.
    assert [header for _, _, header in calls][1:] == [2, 3]
    gaps = [calls[1][0] - calls[0][0], calls[2][0] - calls[1][0]]
    expected = policy.delays()[:2]
    assert expected == (1, 2)
    for gap, delay in zip(gaps, expected, strict=True):
        assert delay <= gap < delay + LATE_BOUND_S, f"gaps {gaps} vs policy delays {expected}"
    print(f"\nretry gaps [{bus_url.split(':')[0]}]: {[round(g, 3) for g in gaps]} s")


async def test_a_retry_reaches_only_the_failing_group(bus_url: str, unique) -> None:
    """Two groups subscribe to the same events; one always fails and goes through all its
    delayed retries into its DLQ. The other group's handler is called exactly once per event:
    the retries went to the failing group's own exchange only."""
    policy = RetryPolicy(delayed=2, base=1, factor=2, jitter=0)  # attempts at ~0, 1, 3 s
    ids = [f"c-{i}" for i in range(5)]
    failing_calls: list[tuple[str, int]] = []
    steady_calls: list[str] = []

    async def always_fails(event: ChargeAttempted, ctx: MessageContext) -> None:
        failing_calls.append((event.charge_id, ctx.attempt))
        raise RuntimeError("down")

    async def steady(event: ChargeAttempted) -> None:
        steady_calls.append(event.charge_id)

    failing = MessageBus(unique("fraud-check"), bus_url)
    failing_sub = await failing.subscribe(ChargeAttempted, always_fails, retry=policy)
    other = MessageBus(unique("ledger"), bus_url)
    # The same delayed policy, so this group is bound to the delay levels' delivery exchange
    # too: a retry addressed to the wrong exchange would reach it.
    other_sub = await other.subscribe(ChargeAttempted, steady, retry=policy)
    async with failing, other:
        for charge_id in ids:
            await other.publish(ChargeAttempted(charge_id=charge_id))

        async def all_dead_lettered() -> bool:
            return await _messages(failing, failing_sub.dlq_name) == len(ids)

        budget = sum(policy.delays()) + 2 * LATE_BOUND_S + 8
        deadline = time.monotonic() + budget
        while not await all_dead_lettered():
            assert time.monotonic() < deadline, f"DLQ not filled in {budget} s: {failing_calls}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # anything still travelling would arrive now
        assert await _messages(other, other_sub.queue_name) == 0
        assert await _messages(other, other_sub.dlq_name) == 0

    assert Counter(steady_calls) == dict.fromkeys(ids, 1)
    per_event = {cid: sorted(a for c, a in failing_calls if c == cid) for cid in ids}
    assert per_event == {cid: [1, 2, 3] for cid in ids}


async def test_handler_past_its_timeout_is_retried_then_dead_lettered(bus_url: str, unique) -> None:
    """A handler that sleeps past its ``timeout`` is cancelled, retried after the policy's delay,
    and once the retries are exhausted the message is in the DLQ with reason ``timeout``, the
    attempts, the handler's name and the exception type."""
    policy = RetryPolicy(delayed=1, base=1, jitter=0)
    timeout = 0.3
    started: list[tuple[float, int]] = []
    cancelled: list[int] = []

    async def slow(event: ChargeAttempted, ctx: MessageContext) -> None:
        started.append((time.monotonic(), ctx.attempt))
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)
            raise

    group = unique("reports")
    bus = MessageBus(group, bus_url)
    sub = await bus.subscribe(ChargeAttempted, slow, retry=policy, timeout=timeout)
    async with bus:
        published_id = await bus.publish(ChargeAttempted(charge_id="slow-1"))
        dead = await _take_dead_letter(bus, sub, within=2 * timeout + 1 + LATE_BOUND_S + 8)
        headers = dict(dead.headers)
        await dead.ack()
        assert await _messages(bus, sub.dlq_name) == 0
        assert await _messages(bus, sub.queue_name) == 0

    assert [attempt for _, attempt in started] == [1, 2]
    assert cancelled == [1, 2]
    gap = started[1][0] - started[0][0]
    assert timeout + 1 <= gap < timeout + 1 + LATE_BOUND_S, gap
    assert dead.message_id == published_id
    assert headers["x-banyan-reason"] == "timeout"
    assert headers["x-attempt"] == policy.max_attempts == 2
    assert headers["x-banyan-handler"] == _name(slow)
    assert headers["x-banyan-exception-type"] == "TimeoutError"
    assert str(timeout) in str(headers["x-banyan-exception-message"])
    assert headers["x-banyan-group"] == group


async def test_immediate_retries_rerun_in_place(bus_url: str, unique) -> None:
    """``RetryPolicy(immediate=2, delayed=0)``: a handler failing twice is re-run at once on the
    same delivery (no ``x-attempt`` header, no trip through the delay levels, gaps far below
    their 1 s resolution), ``ctx.attempt`` 1, 2, 3. One that keeps failing is dead-lettered
    after 3 attempts with ``x-attempt`` = 3."""
    policy = RetryPolicy(immediate=2, delayed=0)
    calls: dict[str, list[tuple[float, int, object]]] = {"flaky": [], "broken": []}

    async def handler(event: ChargeAttempted, ctx: MessageContext) -> None:
        mine = calls[event.charge_id]
        mine.append((time.monotonic(), ctx.attempt, ctx.headers.get("x-attempt")))
        if event.charge_id == "broken" or len(mine) <= 2:
            raise ConnectionResetError(f"blip {len(mine)}")

    bus = MessageBus(unique("gateway"), bus_url)
    sub = await bus.subscribe(ChargeAttempted, handler, retry=policy)
    async with bus:
        await bus.publish(ChargeAttempted(charge_id="flaky"))
        await bus.publish(ChargeAttempted(charge_id="broken"))
        dead = await _take_dead_letter(bus, sub, within=10)
        headers = dict(dead.headers)
        await dead.ack()
        await wait_until(lambda: len(calls["flaky"]) >= 3, timeout=10, what="flaky 3 calls")
        await asyncio.sleep(0.5)
        assert await _messages(bus, sub.queue_name) == 0
        assert await _messages(bus, sub.dlq_name) == 0

    for charge_id in ("flaky", "broken"):
        attempts = [attempt for _, attempt, _ in calls[charge_id]]
        assert attempts == [1, 2, 3], (charge_id, attempts)
        assert {header for _, _, header in calls[charge_id]} <= {None, 1}, calls[charge_id]
        times = [t for t, _, _ in calls[charge_id]]
        assert times[-1] - times[0] < 1.0, f"{charge_id} was not retried in place: {times}"
    assert headers["x-banyan-reason"] == "handler-failed"
    assert headers["x-attempt"] == 3
    assert headers["x-banyan-exception-type"] == "ConnectionResetError"
    assert headers["x-banyan-exception-message"] == "blip 3"


async def test_exhausted_retries_dead_letter_with_failure_details(bus_url: str, unique) -> None:
    """When the delayed retries are exhausted the message reaches the DLQ (body and id intact)
    with reason ``handler-failed``, the exception's type and message, a traceback,
    ``x-attempt`` = attempts made, the handler and group, and first/last failure times that are
    the policy's delay apart."""
    policy = RetryPolicy(delayed=1, base=1, jitter=0)
    calls: list[int] = []

    async def always_fails(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError(f"card declined for {event.charge_id}")

    group = unique("payments")
    bus = MessageBus(group, bus_url)
    sub = await bus.subscribe(ChargeAttempted, always_fails, retry=policy)
    async with bus:
        published_id = await bus.publish(ChargeAttempted(charge_id="c-42"))
        dead = await _take_dead_letter(bus, sub, within=1 + LATE_BOUND_S + 8)
        headers = dict(dead.headers)
        body = dead.body
        await dead.ack()
        await asyncio.sleep(0.3)
        assert await _messages(bus, sub.dlq_name) == 0
        assert await _messages(bus, sub.queue_name) == 0

    assert calls == [1, 2]
    assert dead.message_id == published_id
    assert dead.message_type == "ChargeAttempted"
    assert b'"chargeId":"c-42"' in body
    assert headers["x-banyan-reason"] == "handler-failed"
    assert headers["x-banyan-exception-type"] == "RuntimeError"
    assert headers["x-banyan-exception-message"] == "card declined for c-42"
    traceback_text = str(headers["x-banyan-traceback"])
    assert "RuntimeError: card declined for c-42" in traceback_text
    assert "always_fails" in traceback_text
    assert headers["x-attempt"] == policy.max_attempts == 2
    assert headers["x-banyan-handler"] == _name(always_fails)
    assert headers["x-banyan-group"] == group
    first = _parse_ts(headers["x-banyan-first-failure"])
    last = _parse_ts(headers["x-banyan-last-failure"])
    # The first failure, then the 1 s delay, then the second (timestamps are whole ms).
    assert timedelta(milliseconds=999) <= last - first < timedelta(seconds=1 + LATE_BOUND_S)


async def test_exceptions_outside_the_policy_dead_letter_at_once(bus_url: str, unique) -> None:
    """``dont_retry_on`` wins over ``retry_on``: a ``FileNotFoundError`` (an ``OSError``) with
    ``retry_on=(OSError,)``, ``dont_retry_on=(FileNotFoundError,)`` is dead-lettered at the
    first failure, as is a ``ValueError`` (not in ``retry_on``), while a ``ConnectionError`` is
    retried as usual."""
    policy = RetryPolicy(
        delayed=3, base=1, jitter=0, retry_on=(OSError,), dont_retry_on=(FileNotFoundError,)
    )
    errors: dict[str, type[Exception]] = {
        "missing": FileNotFoundError,
        "invalid": ValueError,
        "transient": ConnectionError,
    }
    calls: dict[str, list[int]] = {charge_id: [] for charge_id in errors}

    async def handler(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls[event.charge_id].append(ctx.attempt)
        if ctx.attempt == 1:
            raise errors[event.charge_id](f"{event.charge_id} failed")

    bus = MessageBus(unique("settlement"), bus_url)
    sub = await bus.subscribe(ChargeAttempted, handler, retry=policy)
    async with bus:
        for charge_id in errors:
            await bus.publish(ChargeAttempted(charge_id=charge_id))
        first = await _take_dead_letter(bus, sub, within=10)
        second = await _take_dead_letter(bus, sub, within=10)
        dead = {d.message_id: dict(d.headers) for d in (first, second)}
        for delivery in (first, second):
            await delivery.ack()
        # The retried one needs the policy's first delay (1 s): by then a retry of the
        # others would have happened too.
        await wait_until(
            lambda: calls["transient"] == [1, 2], timeout=1 + LATE_BOUND_S + 8, what="retry"
        )
        await asyncio.sleep(0.5)
        assert await _messages(bus, sub.dlq_name) == 0
        assert await _messages(bus, sub.queue_name) == 0

    assert calls == {"missing": [1], "invalid": [1], "transient": [1, 2]}
    by_type = {h["x-banyan-exception-type"]: h for h in dead.values()}
    assert set(by_type) == {"FileNotFoundError", "ValueError"}
    for kind, headers in by_type.items():
        assert headers["x-banyan-reason"] == "handler-failed", kind
        assert headers["x-attempt"] == 1, kind
        assert headers["x-banyan-handler"] == _name(handler)


async def test_retry_of_a_multi_handler_group_reruns_only_the_failed_and_later_handlers(
    bus_url: str, unique
) -> None:
    """A group with three handlers (definition order) whose 2nd fails once: the delayed retry
    runs the 2nd and 3rd only -- the 1st, which succeeded, is not called twice -- and the 3rd
    never ran before the 2nd succeeded."""
    policy = RetryPolicy(delayed=2, base=1, jitter=0)
    calls: list[tuple[str, str, int]] = []

    async def first(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append(("first", event.charge_id, ctx.attempt))

    async def second(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append(("second", event.charge_id, ctx.attempt))
        if ctx.attempt == 1:
            raise RuntimeError("second handler failed once")

    async def third(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append(("third", event.charge_id, ctx.attempt))

    bus = MessageBus(unique("fulfilment"), bus_url)
    for handler in (first, second, third):
        sub = await bus.subscribe(ChargeAttempted, handler, retry=policy)
    ids = ["a", "b", "c"]
    async with bus:
        for charge_id in ids:
            await bus.publish(ChargeAttempted(charge_id=charge_id))
        await wait_until(
            lambda: sum(name == "third" for name, _, _ in calls) >= len(ids),
            timeout=1 + LATE_BOUND_S + 8,
            what="third handler for every event",
        )
        await asyncio.sleep(0.5)
        assert await _messages(bus, sub.queue_name) == 0
        assert await _messages(bus, sub.dlq_name) == 0

    for charge_id in ids:
        mine = [(name, attempt) for name, cid, attempt in calls if cid == charge_id]
        assert mine == [("first", 1), ("second", 1), ("second", 2), ("third", 2)], charge_id


async def test_immediate_retries_come_before_delayed_ones(bus_url: str, unique) -> None:
    """``RetryPolicy(immediate=1, delayed=1, base=1)`` on a handler that always fails: attempt 2
    follows attempt 1 at once, attempt 3 comes after the 1 s delay, then the DLQ record says
    ``x-attempt`` = 3 (= ``max_attempts``)."""
    policy = RetryPolicy(immediate=1, delayed=1, base=1, jitter=0)
    calls: list[tuple[float, int]] = []

    async def always_fails(event: ChargeAttempted, ctx: MessageContext) -> None:
        calls.append((time.monotonic(), ctx.attempt))
        raise RuntimeError("upstream down")

    bus = MessageBus(unique("payouts"), bus_url)
    sub = await bus.subscribe(ChargeAttempted, always_fails, retry=policy)
    async with bus:
        await bus.publish(ChargeAttempted(charge_id="c-7"))
        dead = await _take_dead_letter(bus, sub, within=1 + LATE_BOUND_S + 8)
        headers = dict(dead.headers)
        await dead.ack()
        await asyncio.sleep(0.3)
        assert await _messages(bus, sub.queue_name) == 0

    assert [attempt for _, attempt in calls] == [1, 2, 3]
    assert calls[1][0] - calls[0][0] < 1.0, calls
    assert 1 <= calls[2][0] - calls[1][0] < 1 + LATE_BOUND_S, calls
    assert headers["x-attempt"] == policy.max_attempts == 3
    assert headers["x-banyan-reason"] == "handler-failed"


async def test_a_timeout_error_raised_inside_the_handler_is_a_handler_failure(
    bus_url: str, unique
) -> None:
    """A ``TimeoutError`` the handler's own code raises (here ``asyncio.wait_for`` on a slow
    call) while the bus's ``timeout`` has not passed is an ordinary failure: the DLQ record says
    ``handler-failed`` with the handler's exception, not ``timeout`` with the bus's message."""

    async def calls_slow_upstream(event: ChargeAttempted) -> None:
        await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)

    bus = MessageBus(unique("webhooks"), bus_url)
    sub = await bus.subscribe(
        ChargeAttempted, calls_slow_upstream, retry=RetryPolicy.none(), timeout=30
    )
    async with bus:
        await bus.publish(ChargeAttempted(charge_id="c-9"))
        dead = await _take_dead_letter(bus, sub, within=10)
        headers = dict(dead.headers)
        await dead.ack()

    assert headers["x-banyan-exception-type"] == "TimeoutError"
    assert headers["x-attempt"] == 1
    assert "ran past its timeout" not in str(headers["x-banyan-exception-message"])
    assert headers["x-banyan-reason"] == "handler-failed"
