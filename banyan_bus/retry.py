"""Retry policy: what to do with a message whose handler just failed.

The policy is pure arithmetic — it never sleeps, sends or requeues. The bus
asks :meth:`RetryPolicy.decide` after each failed attempt and carries out the
answer: run again now, send through the delay topology, or dead-letter. Keeping
the decision separate from the doing makes it testable without a broker and
identical on every transport.

Timeouts: the bus treats a handler that overruns its ``timeout`` as a failed
attempt — it cancels the handler and calls :meth:`~RetryPolicy.decide` with a
:class:`TimeoutError`, so timeouts follow the same schedule as exceptions (and
``dont_retry_on=(TimeoutError,)`` opts out).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from banyan_bus.delay import MAX_DELAY_MS

__all__ = ["RetryAction", "RetryDecision", "RetryPolicy"]

RetryAction = Literal["retry_now", "retry_later", "dead_letter"]

_MAX_DELAY_S = MAX_DELAY_MS / 1000


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The answer for one failed attempt.

    ``delay_s`` is the wait before the next attempt for ``"retry_later"`` and
    0 otherwise. ``reason`` is written for humans: it goes to the log and, for
    a dead-letter, into the DLQ record, so it says why in one line.
    """

    action: RetryAction
    delay_s: float
    reason: str


def _name(cls: type[BaseException]) -> str:
    return cls.__qualname__


def _names(classes: tuple[type[BaseException], ...]) -> str:
    return "(" + ", ".join(_name(c) for c in classes) + ("," if len(classes) == 1 else "") + ")"


def _exception_classes(field_name: str, value: Any) -> tuple[type[BaseException], ...]:
    # A single class is accepted for convenience (retry_on=ValueError): the
    # one-element-tuple comma is easy to forget.
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple | list):
        raise ValueError(f"{field_name} must be a tuple of exception classes, got {value!r}")
    classes = tuple(value)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ValueError(f"{field_name} must contain exception classes, got {cls!r}")
    return classes


@dataclass(frozen=True, slots=True, repr=False)
class RetryPolicy:
    """How often, and how late, a failing handler is tried again.

    An attempt fails → the first ``immediate`` failures are retried at once,
    the next ``delayed`` ones after an exponential backoff, and then the
    message is dead-lettered. So a message is handled at most
    :attr:`max_attempts` = 1 + immediate + delayed times.

    * ``immediate`` (default 0): retries without delay. On a broker-backed bus
      an immediate retry re-runs the handler in the same consumer, before the
      message is acked — cheap and good for transient blips (a dropped DB
      connection, a lost race) but useless against an outage that lasts
      seconds, which is why the default relies on delayed retries instead.
    * ``delayed`` (default 5): retries sent through the delay topology, so the
      message leaves the queue and the consumer is free meanwhile — never a
      hot requeue loop.
    * ``base``, ``factor``, ``cap`` (seconds; defaults 1, 2, 300): the k-th
      delayed retry waits ``min(cap, base * factor**(k-1))`` — by default 1, 2,
      4, 8, 16 s. ``cap`` is at most 366 days (the delay topology's limit).
    * ``jitter`` (0..1, default 0.1): a random fraction taken *off* that delay:
      the wait is uniform in ``(d * (1 - jitter), d]``. Downward-only, so
      ``cap`` stays a hard ceiling and :meth:`delays` is an exact upper bound,
      while instances that failed together (a shared outage) still spread out.
      ``jitter=0.5`` is AWS's "equal jitter", ``1.0`` its "full jitter",
      ``0`` none.
    * ``retry_on`` (default ``(Exception,)``) / ``dont_retry_on`` (default
      ``()``): which exceptions are worth retrying. ``dont_retry_on`` wins
      when both match; anything else is dead-lettered at the first failure
      (a validation error will fail the same way five more times).

    ``asyncio.CancelledError``, ``KeyboardInterrupt`` and ``SystemExit`` are
    not :class:`Exception` s and are never retried, whatever ``retry_on``
    says: they mean "stop", not "this message failed", and the bus handles
    them itself (it returns the message to the queue on shutdown).
    """

    immediate: int = 0
    delayed: int = 5
    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        for name in ("immediate", "delayed"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"{name} must be an int >= 0, got {count!r}")
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count!r}")
        for name in ("base", "factor", "cap", "jitter"):
            number = getattr(self, name)
            if (
                isinstance(number, bool)
                or not isinstance(number, int | float)
                or not math.isfinite(number)
            ):
                raise ValueError(f"{name} must be a finite number, got {number!r}")
        if self.base <= 0:
            raise ValueError(f"base must be > 0 seconds, got {self.base!r}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1 (delays never shrink), got {self.factor!r}")
        if self.cap < self.base:
            raise ValueError(f"cap must be >= base ({self.base!r}), got {self.cap!r}")
        if self.cap > _MAX_DELAY_S:
            raise ValueError(
                f"cap must be at most {_MAX_DELAY_S:.0f} s (366 days, the longest delay), "
                f"got {self.cap!r}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter!r}")
        object.__setattr__(self, "retry_on", _exception_classes("retry_on", self.retry_on))
        object.__setattr__(
            self, "dont_retry_on", _exception_classes("dont_retry_on", self.dont_retry_on)
        )

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries: the first failure dead-letters (for non-idempotent side effects)."""
        return cls(immediate=0, delayed=0)

    @classmethod
    def default(cls) -> RetryPolicy:
        """The defaults: 5 delayed retries after 1, 2, 4, 8, 16 s (±10 % jitter)."""
        return cls()

    @property
    def max_attempts(self) -> int:
        """How many times a message is handled at most, the first attempt included."""
        return 1 + self.immediate + self.delayed

    def _nominal(self, k: int) -> float:
        # Multiply step by step, clamping each time, so a large ``delayed``
        # never overflows a float (factor ** 2000 would).
        delay = min(self.cap, self.base)
        for _ in range(k - 1):
            delay = min(self.cap, delay * self.factor)
        return delay

    def delays(self) -> tuple[float, ...]:
        """The delayed-retry schedule without jitter (also its upper bound), in seconds."""
        out: list[float] = []
        delay = min(self.cap, self.base)
        for _ in range(self.delayed):
            out.append(delay)
            delay = min(self.cap, delay * self.factor)
        return tuple(out)

    def decide(
        self,
        attempt: int,
        exc: BaseException,
        *,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """What to do after attempt number ``attempt`` (1-based) failed with ``exc``.

        ``rng`` makes the jitter reproducible in tests; by default the
        module-level generator is used. An ``attempt`` beyond
        :attr:`max_attempts` (the policy was shortened while a message was in
        flight) dead-letters as exhausted.
        """
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1 (1-based), got {attempt!r}")
        kind = type(exc).__qualname__
        if not isinstance(exc, Exception):
            return RetryDecision(
                "dead_letter",
                0.0,
                f"{kind} is not an Exception (cancellation or shutdown); never retried",
            )
        if isinstance(exc, self.dont_retry_on):
            return RetryDecision("dead_letter", 0.0, f"{kind} is in dont_retry_on")
        if not isinstance(exc, self.retry_on):
            return RetryDecision(
                "dead_letter", 0.0, f"{kind} is not in retry_on {_names(self.retry_on)}"
            )
        total = self.max_attempts
        if attempt >= total:
            plural = "" if total == 1 else "s"
            return RetryDecision(
                "dead_letter", 0.0, f"retries exhausted after {total} attempt{plural} ({kind})"
            )
        failed = f"attempt {attempt} of {total} failed ({kind})"
        if attempt <= self.immediate:
            return RetryDecision("retry_now", 0.0, f"{failed}; retrying now")
        nominal = self._nominal(attempt - self.immediate)
        draw = rng.random() if rng is not None else random.random()
        delay = nominal * (1 - self.jitter * draw)
        return RetryDecision("retry_later", delay, f"{failed}; retrying in {delay:.1f} s")

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(immediate={self.immediate}, delayed={self.delayed}, "
            f"base={self.base!r}, factor={self.factor!r}, cap={self.cap!r}, "
            f"jitter={self.jitter!r}, retry_on={_names(self.retry_on)}, "
            f"dont_retry_on={_names(self.dont_retry_on)})"
        )
