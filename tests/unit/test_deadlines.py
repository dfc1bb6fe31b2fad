"""Deadlines: one timer per consumer cancels each attempt at its own deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from banyan_bus.deadlines import DeadlineExceeded, Deadlines


async def _attempt(deadlines: Deadlines, seconds: float) -> str:
    """An attempt as the consumer runs one; returns how it ended."""
    try:
        await deadlines.bounded(asyncio.sleep(seconds), "nap")
    except DeadlineExceeded as exc:
        cause, text = exc.__cause__, str(exc)
    else:
        return "done"
    assert isinstance(cause, asyncio.CancelledError)
    assert "work nap ran past its timeout of" in text  # the default kind, then the name
    return "timeout"


async def test_each_attempt_is_cancelled_at_its_own_deadline() -> None:
    deadlines = Deadlines(0.3)
    started = time.monotonic()
    ended: dict[str, float] = {}

    async def run(name: str, delay: float, seconds: float) -> str:
        await asyncio.sleep(delay)
        result = await _attempt(deadlines, seconds)
        ended[name] = time.monotonic() - started
        return result

    results = await asyncio.gather(
        run("slow-a", 0.0, 5), run("fast", 0.05, 0.1), run("slow-b", 0.2, 5)
    )
    assert results == ["timeout", "done", "timeout"]
    assert 0.28 <= ended["slow-a"] < 0.45
    assert 0.48 <= ended["slow-b"] < 0.65


async def test_attempts_in_one_task_get_a_fresh_deadline_each() -> None:
    deadlines = Deadlines(0.2)
    assert await _attempt(deadlines, 0.15) == "done"
    assert await _attempt(deadlines, 0.15) == "done"  # would be 0.3 s since the first start
    assert await _attempt(deadlines, 1) == "timeout"


async def test_a_cancellation_from_outside_is_not_a_timeout() -> None:
    deadlines = Deadlines(5)
    task = asyncio.ensure_future(_attempt(deadlines, 5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_work_that_swallows_the_cancellation_just_returns() -> None:
    deadlines = Deadlines(0.1)

    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    assert await deadlines.bounded(stubborn()) == "swallowed"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # taken back, as asyncio.timeout does


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0 seconds"):
        Deadlines(0)
