"""Effectively-once handling: remember which (group, handler, event) already ran.

RabbitMQ delivers at least once, so a handler can see the same event twice: a
redelivery after a lost ack, a publisher retry, a killed consumer. With
``idempotent=True`` (or ``idempotency_key=callable``) the engine asks an
:class:`IdempotencyStore` before each handler run, so a duplicate causes one
side effect. The life of one key::

    claim ──"claimed"──▶ run handler ──ok──▶ complete   (key is "done" for ``ttl``)
      │                                └─raise─▶ release (a retry may claim again)
      ├──"done"───▶ skip: ack without calling the handler (a counted duplicate)
      └──"busy"───▶ another worker runs it right now: try again later, do not run

Why a claim and not just "mark done afterwards": two copies of one event can
arrive at two instances at the same moment; both would see "not done" and both
would run. The claim is the lock that makes one of them wait.

Why a *lease*: a worker that dies while holding a claim can never release it.
The claim therefore expires after ``lease`` seconds, and then the event (which
the broker redelivers, since it was never acked) is handled by someone else.
Choose a lease longer than the handler can run (its ``timeout`` times its
immediate attempts): a lease that runs out under a live handler lets a
duplicate run concurrently.

Why a *token*: when a lease ran out and another worker claimed the key, the
first worker's late ``complete``/``release`` must not touch the new holder's
claim. Every claim carries a token unique to that attempt; ``complete`` and
``release`` are compare-and-set on it.

Two stores ship: :class:`MemoryIdempotencyStore` (one process, the default)
and :class:`~banyan_bus.idempotency_redis.RedisIdempotencyStore` (shared by every instance
of a service, in its own module).
The engine uses :class:`Deduplicator` (or the lower-level :func:`guard`)::

    dedup = Deduplicator(store, group="emails", lease=150)
    async with dedup.guard("send_welcome", message_id, event) as outcome:
        if outcome == "run":
            await send_welcome(event)
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar, runtime_checkable

import structlog
from opentelemetry import metrics

from banyan_bus.errors import (
    ConfigurationError,
    HandlerError,
    IdempotencyKeyBusy,
    IdempotencyStoreError,
)

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_TTL",
    "ClaimResult",
    "Deduplicator",
    "IdempotencyKeyBusy",
    "IdempotencyStore",
    "IdempotencyStoreError",
    "MemoryIdempotencyStore",
    "Outcome",
    "guard",
    "idempotency_key",
    "make_key",
]

log = structlog.get_logger("banyan_bus.idempotency")

ClaimResult = Literal["claimed", "done", "busy"]
"""What :meth:`IdempotencyStore.claim` found: run it, skip it, or come back later."""

Outcome = Literal["run", "skip"]
"""What :func:`guard` tells its caller to do with the handler."""

DEFAULT_LEASE = 300.0
"""Seconds a claim lasts: above the engine's default handler timeout (120 s) with margin."""

DEFAULT_TTL = 24 * 3600.0
"""Seconds a done key is remembered: longer than any redelivery or publisher retry window."""

DEFAULT_MAX_KEYS = 100_000
"""Keys the in-process store holds at most (about 50 MiB); the least recently used go first."""

_DONE = "done"  # the value of a completed key; tokens are uuid hex, so never equal to it

E = TypeVar("E")


# -- the plug-in point ----------------------------------------------------------------------


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where processed keys are remembered. Implement it to plug in another database.

    All operations must be atomic per key, as seen by every worker that shares
    the store. ``token`` is chosen by the caller, unique per claim attempt
    (:func:`guard` uses a uuid4). ``lease`` and ``ttl`` are seconds, > 0.
    """

    async def claim(self, key: str, *, token: str, lease: float) -> ClaimResult:
        """Claim ``key`` for ``lease`` seconds under ``token``.

        Returns ``"claimed"`` if the key was free (or expired, or already held
        under this same ``token``: a claim is safe to repeat after a network
        error); ``"done"`` if it was completed within its ttl; ``"busy"`` if
        another token holds an unexpired claim.
        """
        ...

    async def complete(self, key: str, *, token: str, ttl: float) -> bool:
        """Mark ``key`` done for ``ttl`` seconds, if ``token`` still holds it (or nobody does).

        Returns False, changing nothing, when another token holds the key or it
        is already done: this worker's lease ran out and someone else took
        over, so the handler may have run twice. (A key nobody holds any more
        is recorded as done: the handler did succeed.)
        """
        ...

    async def release(self, key: str, *, token: str) -> bool:
        """Drop the claim so a retry can run; only if ``token`` holds it.

        Returns False, changing nothing, when the claim is not this token's
        (expired, taken over, or done).
        """
        ...

    async def close(self) -> None:
        """Free connections. Keys are kept: they belong to the store, not to this client."""
        ...


# -- keys -------------------------------------------------------------------------------------


def _escape(part: str) -> str:
    # ":" separates the parts; escaping it (and "%") keeps group "a:b" + handler "c"
    # distinct from group "a" + handler "b:c".
    return part.replace("%", "%25").replace(":", "%3A")


def idempotency_key(group: str, handler: str, message_id: str) -> str:
    """The default key: one per (subscription group, handler, event id).

    Group and handler are part of it because each group gets its own copy of an
    event and each handler its own side effect: all of them must run once.

    >>> idempotency_key("emails", "app.send_welcome", "evt_1")
    'emails:app.send_welcome:evt_1'
    """
    return f"{_escape(group)}:{_escape(handler)}:{_escape(message_id)}"


def make_key(
    group: str,
    handler: str,
    message_id: str,
    event: E,
    custom: Callable[[E], str] | None = None,
) -> str:
    """The key for one handler run: ``custom(event)`` in place of the event id if given.

    A custom key (``idempotency_key=lambda e: e.order_id``) makes two *different*
    events with the same business key count as duplicates. It is still scoped
    by group and handler, so it never silences another handler.

    Raises :class:`~banyan_bus.errors.HandlerError` if ``custom`` returns
    anything but a non-empty ``str``; whatever ``custom`` raises propagates
    (a bug in the user's key function fails the attempt like a handler bug).
    """
    if custom is None:
        return idempotency_key(group, handler, message_id)
    value: object = custom(event)
    if not isinstance(value, str) or not value:
        name = getattr(custom, "__qualname__", repr(custom))
        raise HandlerError(
            f"idempotency_key function {name} of handler {handler} returned {value!r} for "
            f"event {message_id}; it must return a non-empty str"
        )
    return idempotency_key(group, handler, value)


def _positive(name: str, seconds: float) -> float:
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def _check_token(token: str) -> None:
    if not token or token == _DONE:
        raise ValueError(f"claim token must be a non-empty string other than {_DONE!r}")


# -- in memory ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    value: str  # the holder's token, or _DONE
    expires_at: float


class MemoryIdempotencyStore:
    """Keys in this process's memory: the default, and the store for tests.

    It deduplicates only what this process sees, and forgets on restart: two
    instances of a service need a shared store (:class:`RedisIdempotencyStore`).

    Memory is bounded twice. Expiry is lazy (an entry is judged against
    ``clock()`` when read) and expired entries are purged on every operation
    from a heap ordered by expiry, so the store holds at most the keys touched
    within one ``ttl``. And it never holds more than ``max_keys`` (default
    :data:`DEFAULT_MAX_KEYS`, about 50 MiB at ~500 B a key): past that the least
    recently written key is evicted and counted in the metric
    ``banyan.idempotency.evicted``. Why a cap and not only the TTL: the TTL
    (24 h by default) has to outlast every redelivery window, so at 1,000 events
    a second it alone would let the store grow to 86 M keys. An evicted key
    only weakens deduplication for that one event (a duplicate arriving after
    the eviction runs again) — size ``max_keys`` above the events a process
    handles within its longest redelivery window, or share a Redis store.

    Operations never await, so they are atomic within one event loop; the store
    is not thread-safe. ``clock`` (seconds, monotonic) is injectable so tests
    need not sleep.

    >>> store = MemoryIdempotencyStore(max_keys=10_000)
    """

    def __init__(
        self,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError(
                f"max_keys must be a positive int (keys held at most), got {max_keys!r}"
            )
        self.max_keys = max_keys
        self.evicted = 0
        self._clock = clock
        # Insertion-ordered: every write re-inserts its key at the end, so the first key
        # is the least recently written one, the next to evict.
        self._entries: dict[str, _Entry] = {}
        # (expires_at, sequence, key); stale items (the key was rewritten or evicted since)
        # are harmless: popping one deletes the key only if the key itself has expired.
        # Compacted when stale items outnumber live keys, so it is bounded too.
        self._expiries: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self._evictions = metrics.get_meter("banyan_bus").create_counter(
            "banyan.idempotency.evicted",
            unit="{key}",
            description="Keys evicted from the in-process idempotency store at its max_keys",
        )

    def __len__(self) -> int:
        """Keys held (claimed or done), after purging the expired ones."""
        self._purge(self._clock())
        return len(self._entries)

    def _purge(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, _, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at <= now:
                del self._entries[key]

    def _set(self, key: str, value: str, expires_at: float) -> None:
        self._entries.pop(key, None)
        self._entries[key] = _Entry(value, expires_at)
        heapq.heappush(self._expiries, (expires_at, next(self._sequence), key))
        if len(self._entries) > self.max_keys:
            del self._entries[next(iter(self._entries))]
            self.evicted += 1
            self._evictions.add(1)
        if len(self._expiries) > 2 * len(self._entries) + 64:
            self._expiries = [
                (entry.expires_at, next(self._sequence), k) for k, entry in self._entries.items()
            ]
            heapq.heapify(self._expiries)

    def _live(self, key: str) -> tuple[_Entry | None, float]:
        now = self._clock()
        self._purge(now)
        return self._entries.get(key), now

    async def claim(self, key: str, *, token: str, lease: float) -> ClaimResult:
        _check_token(token)
        lease = _positive("lease", lease)
        entry, now = self._live(key)
        if entry is not None and entry.value == _DONE:
            return "done"
        if entry is not None and entry.value != token:
            return "busy"
        self._set(key, token, now + lease)
        return "claimed"

    async def complete(self, key: str, *, token: str, ttl: float) -> bool:
        _check_token(token)
        ttl = _positive("ttl", ttl)
        entry, now = self._live(key)
        if entry is not None and entry.value != token:
            return False
        self._set(key, _DONE, now + ttl)
        return True

    async def release(self, key: str, *, token: str) -> bool:
        _check_token(token)
        entry, _ = self._live(key)
        if entry is None or entry.value != token:
            return False
        del self._entries[key]
        return True

    async def close(self) -> None:
        """Nothing to free; the keys stay, so a bus restarted in-process keeps its memory."""


# -- what the engine calls ------------------------------------------------------------------


@asynccontextmanager
async def guard(
    store: IdempotencyStore,
    key: str,
    *,
    lease: float = DEFAULT_LEASE,
    ttl: float = DEFAULT_TTL,
) -> AsyncIterator[Outcome]:
    """Claim ``key`` around one handler run; yields ``"run"`` or ``"skip"``.

    * ``"run"``: the key is claimed. Run the handler inside the block. Leaving
      the block normally completes the key (remembered for ``ttl``); leaving
      it with any exception (including cancellation and timeouts) releases the
      claim so a retry can run, and re-raises.
    * ``"skip"``: the key was done already; do not call the handler, ack the
      message and count a duplicate. Nothing is written on exit.
    * busy: raises :class:`IdempotencyKeyBusy` before the block; retry later.
    * the store failing on claim raises :class:`IdempotencyStoreError` before
      the block; retry later.

    Store failures on exit are logged, never raised: after success the side
    effect has happened (raising would make the engine run it again), and after
    a failure the handler's own exception is the one worth reporting. Either
    way the claim frees itself when its lease ends.

    >>> async def handle(store, key):  # doctest: +SKIP
    ...     async with guard(store, key, lease=150) as outcome:
    ...         if outcome == "run":
    ...             await send_welcome_email()
    """
    token = uuid.uuid4().hex
    result = await store.claim(key, token=token, lease=lease)
    if result == "done":
        yield "skip"
        return
    if result == "busy":
        raise IdempotencyKeyBusy(key)
    try:
        yield "run"
    except BaseException:
        try:
            await store.release(key, token=token)
        except Exception as exc:
            log.error("idempotency_release_failed", key=key, error=str(exc), lease_s=lease)
        raise
    try:
        recorded = await store.complete(key, token=token, ttl=ttl)
    except Exception as exc:
        log.error("idempotency_complete_failed", key=key, error=str(exc), lease_s=lease)
        return
    if not recorded:
        log.warning(
            "idempotency_lease_lost",
            key=key,
            lease_s=lease,
            detail="the handler outlived its claim and another worker took the key over, so "
            "it may have run twice; use a lease longer than the handler's timeout",
        )


@dataclass(frozen=True, slots=True)
class Deduplicator(Generic[E]):
    """One subscription's idempotency settings, ready for the engine.

    ``key`` is the user's ``idempotency_key`` function, or None for the event
    id. ``lease`` should exceed the handler's timeout times its immediate
    attempts (see the module docstring).

    >>> dedup = Deduplicator(MemoryIdempotencyStore(), group="emails")
    >>> dedup.key_for("send_welcome", "evt_1", object())
    'emails:send_welcome:evt_1'
    """

    store: IdempotencyStore
    group: str
    lease: float = DEFAULT_LEASE
    ttl: float = DEFAULT_TTL
    key: Callable[[E], str] | None = None

    def __post_init__(self) -> None:
        _positive("lease", self.lease)
        _positive("ttl", self.ttl)
        if not isinstance(self.store, IdempotencyStore):
            raise ConfigurationError(
                f"idempotency store {self.store!r} does not implement IdempotencyStore "
                f"(claim, complete, release, close)"
            )

    def key_for(self, handler: str, message_id: str, event: E) -> str:
        """The store key for this handler and event (see :func:`make_key`)."""
        return make_key(self.group, handler, message_id, event, self.key)

    def guard(
        self, handler: str, message_id: str, event: E
    ) -> AbstractAsyncContextManager[Outcome]:
        """:func:`guard` on this handler's key for ``event``, with these lease and ttl."""
        return guard(
            self.store,
            self.key_for(handler, message_id, event),
            lease=self.lease,
            ttl=self.ttl,
        )
