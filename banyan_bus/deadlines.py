"""Handler time limits: one timer per consumer, not one per attempt.

``asyncio.timeout`` schedules a timer handle on entry and cancels it on exit;
per message that showed in profiles, and a busy consumer with a 30 s limit
keeps tens of thousands of cancelled handles in the loop's heap. Every attempt
of one consumer has the same limit, so deadlines fall due in the order the
attempts started: one timer, set for the oldest attempt still running, serves
them all, and a handler is cancelled exactly at its deadline, as with
``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The limit passed while the awaited work ran; it was cancelled.

    Its own class, so that a ``TimeoutError`` the work raised itself is not
    mistaken for it.
    """


class Deadlines:
    """Work running under one fixed limit, oldest first, with its deadlines.

    ``await deadlines.bounded(work)`` runs ``work`` in the current task and
    raises ``DeadlineExceeded`` if the limit passes first. A task runs one
    bounded piece at a time (nested ones belong to other ``Deadlines``: a
    publish inside a handler); a cancellation from elsewhere stays a
    cancellation.
    """

    __slots__ = ("_expired", "_loop", "_running", "_timer", "kind", "limit")

    def __init__(self, limit: float, kind: str = "work") -> None:
        if limit <= 0:
            raise ValueError(f"a handler time limit must be > 0 seconds, got {limit!r}")
        self.limit = limit
        self.kind = kind  # names the work in the timeout message: "handler", "publish"
        self._running: OrderedDict[asyncio.Task[Any], float] = OrderedDict()
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def bounded(self, work: Awaitable[T], name: str = "") -> T:
        task = asyncio.current_task()
        assert task is not None, "Deadlines.bounded runs inside a task"
        cancelling = task.cancelling()
        self.start(task)
        try:
            return await work
        except asyncio.CancelledError as exc:
            if self.expired(task) and task.uncancel() <= cancelling:
                what = f"{self.kind} {name}" if name else self.kind
                raise DeadlineExceeded(f"{what} ran past its timeout of {self.limit} s") from exc
            raise
        finally:
            if self.expired(task):  # the work swallowed our cancellation and returned
                task.uncancel()

    def start(self, task: asyncio.Task[Any]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limit
        self._running[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """End ``task``'s attempt; True if its deadline passed and it was cancelled for it."""
        self._running.pop(task, None)
        if self._expired and task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # set by start(), which arms the timer
        now = loop.time()
        running = self._running
        while running:
            task, deadline = next(iter(running.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire)
                return
            running.popitem(last=False)
            if not task.done():
                self._expired.add(task)
                task.cancel()
