"""The idempotency store layer without I/O: MemoryIdempotencyStore, keys, and guard.

Time is a fake clock, so lease and ttl expiry take no wall time.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from structlog.testing import capture_logs

from banyan_bus.errors import BanyanError, ConfigurationError, HandlerError
from banyan_bus.idempotency import (
    DEFAULT_LEASE,
    DEFAULT_MAX_KEYS,
    DEFAULT_TTL,
    ClaimResult,
    Deduplicator,
    IdempotencyKeyBusy,
    IdempotencyStore,
    IdempotencyStoreError,
    MemoryIdempotencyStore,
    guard,
    idempotency_key,
    make_key,
)
from banyan_bus.idempotency_redis import RedisIdempotencyStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryIdempotencyStore:
    return MemoryIdempotencyStore(clock=clock)


# -- store: claim / done / busy / release ----------------------------------------------------


def test_memory_store_implements_the_protocol() -> None:
    assert isinstance(MemoryIdempotencyStore(), IdempotencyStore)


async def test_first_claim_wins_and_others_are_busy(store: MemoryIdempotencyStore) -> None:
    assert await store.claim("k", token="a", lease=10) == "claimed"
    assert await store.claim("k", token="b", lease=10) == "busy"
    assert await store.claim("k", token="c", lease=10) == "busy"


async def test_claim_is_repeatable_by_its_own_token(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    assert await store.claim("k", token="a", lease=10) == "claimed"
    clock.advance(8)
    # A repeated claim (say, after a network error) keeps the claim and renews the lease.
    assert await store.claim("k", token="a", lease=10) == "claimed"
    clock.advance(8)
    assert await store.claim("k", token="b", lease=10) == "busy"


async def test_completed_key_is_done(store: MemoryIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=10)
    assert await store.complete("k", token="a", ttl=60) is True
    assert await store.claim("k", token="b", lease=10) == "done"
    assert await store.claim("k", token="a", lease=10) == "done"


async def test_released_key_can_be_claimed_again(store: MemoryIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=10)
    assert await store.release("k", token="a") is True
    assert await store.claim("k", token="b", lease=10) == "claimed"


async def test_keys_are_independent(store: MemoryIdempotencyStore) -> None:
    assert await store.claim("k1", token="a", lease=10) == "claimed"
    assert await store.claim("k2", token="b", lease=10) == "claimed"


# -- store: expiry ---------------------------------------------------------------------------


async def test_claim_of_a_dead_worker_expires_after_its_lease(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    await store.claim("k", token="dead", lease=30)
    clock.advance(29.9)
    assert await store.claim("k", token="b", lease=30) == "busy"
    clock.advance(0.1)
    assert await store.claim("k", token="b", lease=30) == "claimed"


async def test_done_is_forgotten_after_ttl(store: MemoryIdempotencyStore, clock: FakeClock) -> None:
    await store.claim("k", token="a", lease=10)
    await store.complete("k", token="a", ttl=100)
    clock.advance(99)
    assert await store.claim("k", token="b", lease=10) == "done"
    clock.advance(1)
    assert await store.claim("k", token="b", lease=10) == "claimed"


async def test_expired_entries_are_purged(store: MemoryIdempotencyStore, clock: FakeClock) -> None:
    for i in range(1000):
        await store.claim(f"claim-{i}", token="a", lease=10)
    for i in range(500):
        await store.claim(f"done-{i}", token="a", lease=10)
        await store.complete(f"done-{i}", token="a", ttl=100)
    assert len(store) == 1500
    clock.advance(10)
    assert len(store) == 500  # the claims expired; the done keys live on
    clock.advance(90)
    assert len(store) == 0
    # The expiry heap does not keep what it purged either: memory is really freed.
    assert store._expiries == []


async def test_any_operation_purges(store: MemoryIdempotencyStore, clock: FakeClock) -> None:
    for i in range(100):
        await store.claim(f"k{i}", token="a", lease=1)
    clock.advance(1)
    await store.claim("other", token="a", lease=1)
    assert set(store._entries) == {"other"}


async def test_store_holds_at_most_max_keys_evicting_the_least_recently_written(
    clock: FakeClock,
) -> None:
    store = MemoryIdempotencyStore(max_keys=100, clock=clock)
    for i in range(1000):
        await store.claim(f"k{i}", token="a", lease=60)
        await store.complete(f"k{i}", token="a", ttl=DEFAULT_TTL)
    assert len(store) == 100
    assert store.evicted == 900
    # The oldest keys are gone (a late duplicate of them would run again), the newest stay.
    assert await store.claim("k0", token="b", lease=60) == "claimed"
    assert await store.claim("k999", token="b", lease=60) == "done"
    # The expiry heap is compacted with the entries: memory is bounded, not only the dict.
    assert len(store._expiries) <= 2 * len(store) + 64


async def test_rewriting_a_key_makes_it_recent(clock: FakeClock) -> None:
    store = MemoryIdempotencyStore(max_keys=2, clock=clock)
    await store.claim("a", token="t", lease=60)
    await store.claim("b", token="t", lease=60)
    await store.complete("a", token="t", ttl=60)  # "a" is now the most recent
    await store.claim("c", token="t", lease=60)  # evicts "b"
    assert set(store._entries) == {"a", "c"}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_keys_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="max_keys must be a positive int"):
        MemoryIdempotencyStore(max_keys=bad)  # type: ignore[arg-type]


def test_default_bound_is_documented() -> None:
    assert MemoryIdempotencyStore().max_keys == DEFAULT_MAX_KEYS == 100_000


# -- store: compare-and-set on the token -----------------------------------------------------


async def test_stale_complete_does_not_clobber_the_new_holder(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    await store.claim("k", token="slow", lease=10)
    clock.advance(10)  # the slow worker's lease ran out...
    assert await store.claim("k", token="new", lease=10) == "claimed"  # ...and it was taken over
    assert await store.complete("k", token="slow", ttl=60) is False
    assert await store.claim("k", token="third", lease=10) == "busy"  # still the new holder's
    assert await store.complete("k", token="new", ttl=60) is True
    assert await store.claim("k", token="third", lease=10) == "done"


async def test_stale_release_does_not_free_the_new_holder(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    await store.claim("k", token="slow", lease=10)
    clock.advance(10)
    await store.claim("k", token="new", lease=10)
    assert await store.release("k", token="slow") is False
    assert await store.claim("k", token="third", lease=10) == "busy"


async def test_release_never_undoes_done(store: MemoryIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=10)
    await store.complete("k", token="a", ttl=60)
    assert await store.release("k", token="a") is False
    assert await store.claim("k", token="b", lease=10) == "done"


async def test_complete_after_expiry_with_no_new_holder_records_done(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    await store.claim("k", token="slow", lease=10)
    clock.advance(15)
    # Nobody took over: the handler did succeed, so remembering it is right.
    assert await store.complete("k", token="slow", ttl=60) is True
    assert await store.claim("k", token="b", lease=10) == "done"


async def test_release_of_an_unknown_key_is_refused(store: MemoryIdempotencyStore) -> None:
    assert await store.release("nothing", token="a") is False


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
async def test_lease_and_ttl_must_be_positive(store: MemoryIdempotencyStore, bad: float) -> None:
    with pytest.raises(ConfigurationError, match="lease"):
        await store.claim("k", token="a", lease=bad)
    with pytest.raises(ConfigurationError, match="ttl"):
        await store.complete("k", token="a", ttl=bad)


@pytest.mark.parametrize("bad", ["", "done"])
async def test_token_cannot_be_empty_or_the_done_marker(
    store: MemoryIdempotencyStore, bad: str
) -> None:
    with pytest.raises(ValueError, match="token"):
        await store.claim("k", token=bad, lease=10)


async def test_close_keeps_the_keys(store: MemoryIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=10)
    await store.close()
    assert await store.claim("k", token="b", lease=10) == "busy"


# -- keys ------------------------------------------------------------------------------------


def test_default_key_is_group_handler_and_event_id() -> None:
    assert idempotency_key("emails", "app.send", "evt_1") == "emails:app.send:evt_1"


def test_key_parts_cannot_run_into_each_other() -> None:
    assert idempotency_key("a:b", "c", "id") != idempotency_key("a", "b:c", "id")
    assert idempotency_key("a%3Ab", "c", "id") != idempotency_key("a:b", "c", "id")


class _Order:
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id


def test_make_key_uses_the_event_id_by_default() -> None:
    assert make_key("g", "h", "evt_1", _Order("o1")) == idempotency_key("g", "h", "evt_1")


def test_custom_key_replaces_the_event_id_but_keeps_group_and_handler() -> None:
    def by_order(event: _Order) -> str:
        return event.order_id

    key = make_key("g", "h", "evt_1", _Order("o1"), by_order)
    assert key == idempotency_key("g", "h", "o1")
    # Two events, same business key: duplicates. Another handler: its own key.
    assert make_key("g", "h", "evt_2", _Order("o1"), by_order) == key
    assert make_key("g", "other", "evt_1", _Order("o1"), by_order) != key


@pytest.mark.parametrize("bad", [None, "", 42])
def test_custom_key_must_return_a_non_empty_str(bad: object) -> None:
    with pytest.raises(HandlerError, match="must return a non-empty str"):
        make_key("g", "h", "evt_1", _Order("o1"), lambda _e: bad)  # type: ignore[arg-type,return-value]


def test_custom_key_errors_propagate() -> None:
    def broken(event: _Order) -> str:
        raise KeyError("order_id")

    with pytest.raises(KeyError):
        make_key("g", "h", "evt_1", _Order("o1"), broken)


# -- guard -----------------------------------------------------------------------------------


async def test_guard_runs_then_marks_done(store: MemoryIdempotencyStore) -> None:
    async with guard(store, "k", lease=10, ttl=60) as outcome:
        assert outcome == "run"
        assert await store.claim("k", token="other", lease=10) == "busy"  # claimed while running
    assert await store.claim("k", token="other", lease=10) == "done"


async def test_guard_skips_a_done_key(store: MemoryIdempotencyStore) -> None:
    runs = 0
    for _ in range(5):
        async with guard(store, "k") as outcome:
            if outcome == "run":
                runs += 1
    assert runs == 1


async def test_guard_releases_on_failure_and_reraises(store: MemoryIdempotencyStore) -> None:
    outcomes: list[str] = []

    async def failing_handler() -> None:
        async with guard(store, "k") as outcome:
            outcomes.append(outcome)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_handler()
    assert outcomes == ["run"]
    # The retry can run.
    async with guard(store, "k") as outcome:
        assert outcome == "run"


async def test_guard_releases_on_cancellation(store: MemoryIdempotencyStore) -> None:
    started = asyncio.Event()

    async def handler() -> None:
        async with guard(store, "k"):
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(handler())
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.claim("k", token="next", lease=10) == "claimed"


async def test_guard_raises_busy_without_entering_the_block(
    store: MemoryIdempotencyStore,
) -> None:
    await store.claim("k", token="elsewhere", lease=10)
    entered = False
    with pytest.raises(IdempotencyKeyBusy) as info:
        async with guard(store, "k"):
            entered = True
    assert not entered
    assert info.value.key == "k"
    assert isinstance(info.value, BanyanError)
    # The other worker's claim is untouched.
    assert await store.claim("k", token="third", lease=10) == "busy"


async def test_concurrent_guards_run_the_handler_once(store: MemoryIdempotencyStore) -> None:
    runs = 0
    results: list[str] = []

    async def deliver() -> None:
        nonlocal runs
        try:
            async with guard(store, "k") as outcome:
                results.append(outcome)
                if outcome == "run":
                    runs += 1
                    await asyncio.sleep(0.01)
        except IdempotencyKeyBusy:
            results.append("busy")

    await asyncio.gather(*(deliver() for _ in range(20)))
    assert runs == 1
    assert results.count("run") == 1
    assert results.count("busy") == 19
    # Afterwards, every redelivery is a skip.
    await deliver()
    assert results[-1] == "skip"


async def test_guard_with_a_lost_lease_warns_and_keeps_the_new_holder(
    store: MemoryIdempotencyStore, clock: FakeClock
) -> None:
    with capture_logs() as logs:
        async with guard(store, "k", lease=10) as outcome:
            assert outcome == "run"
            clock.advance(11)  # the handler outlives its lease...
            assert await store.claim("k", token="other", lease=10) == "claimed"
    assert [entry["event"] for entry in logs] == ["idempotency_lease_lost"]
    assert await store.claim("k", token="third", lease=10) == "busy"  # still "other"'s


class _FailingStore(MemoryIdempotencyStore):
    """Claims work; completing or releasing fails like a store that just went down."""

    async def complete(self, key: str, *, token: str, ttl: float) -> bool:
        raise IdempotencyStoreError("store down")

    async def release(self, key: str, *, token: str) -> bool:
        raise IdempotencyStoreError("store down")


async def test_guard_logs_a_failed_complete_instead_of_raising() -> None:
    # The side effect happened: raising would make the engine run it again.
    with capture_logs() as logs:
        async with guard(_FailingStore(), "k") as outcome:
            assert outcome == "run"
    assert [entry["event"] for entry in logs] == ["idempotency_complete_failed"]


async def test_guard_reraises_the_handler_error_when_release_fails() -> None:
    with capture_logs() as logs, pytest.raises(RuntimeError, match="handler"):
        async with guard(_FailingStore(), "k"):
            raise RuntimeError("handler")
    assert [entry["event"] for entry in logs] == ["idempotency_release_failed"]


async def test_guard_propagates_a_failed_claim() -> None:
    class Down(MemoryIdempotencyStore):
        async def claim(self, key: str, *, token: str, lease: float) -> ClaimResult:
            raise IdempotencyStoreError("store down")

    with pytest.raises(IdempotencyStoreError):
        async with guard(Down(), "k"):
            pytest.fail("the block must not run without a claim")


async def test_guard_uses_a_fresh_token_per_claim(store: MemoryIdempotencyStore) -> None:
    # A token reused across attempts would let a stale worker's release free a new claim.
    tokens: list[str] = []

    class Recording(MemoryIdempotencyStore):
        async def claim(self, key: str, *, token: str, lease: float) -> ClaimResult:
            tokens.append(token)
            return await super().claim(key, token=token, lease=lease)

    recording = Recording()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            async with guard(recording, "k"):
                raise RuntimeError
    assert len(set(tokens)) == 2


# -- Deduplicator ----------------------------------------------------------------------------


async def test_deduplicator_guards_per_handler(store: MemoryIdempotencyStore) -> None:
    dedup: Deduplicator[_Order] = Deduplicator(store, group="orders", lease=10, ttl=60)
    async with dedup.guard("h1", "evt_1", _Order("o1")) as outcome:
        assert outcome == "run"
    async with dedup.guard("h1", "evt_1", _Order("o1")) as outcome:
        assert outcome == "skip"
    async with dedup.guard("h2", "evt_1", _Order("o1")) as outcome:
        assert outcome == "run"  # another handler has its own side effect
    assert await store.claim(idempotency_key("orders", "h1", "evt_1"), token="x", lease=1) == "done"


async def test_deduplicator_with_a_custom_key(store: MemoryIdempotencyStore) -> None:
    dedup: Deduplicator[_Order] = Deduplicator(store, group="orders", key=lambda e: e.order_id)
    async with dedup.guard("h", "evt_1", _Order("o1")) as outcome:
        assert outcome == "run"
    async with dedup.guard("h", "evt_2", _Order("o1")) as outcome:
        assert outcome == "skip"


def test_deduplicator_defaults() -> None:
    dedup: Deduplicator[object] = Deduplicator(MemoryIdempotencyStore(), group="g")
    assert dedup.lease == DEFAULT_LEASE > 120  # above the engine's default handler timeout
    assert dedup.ttl == DEFAULT_TTL == 24 * 3600


def test_deduplicator_validates_its_settings() -> None:
    with pytest.raises(ConfigurationError, match="lease"):
        Deduplicator(MemoryIdempotencyStore(), group="g", lease=0)
    with pytest.raises(ConfigurationError, match="ttl"):
        Deduplicator(MemoryIdempotencyStore(), group="g", ttl=-1)
    with pytest.raises(ConfigurationError, match="IdempotencyStore"):
        Deduplicator(object(), group="g")  # type: ignore[arg-type]


# -- Redis store construction (no I/O) ------------------------------------------------------


def test_redis_store_without_redis_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r'pip install "banyan-bus\[redis\]"'):
        RedisIdempotencyStore()


def test_redis_store_implements_the_protocol() -> None:
    assert isinstance(RedisIdempotencyStore(), IdempotencyStore)  # no I/O until the first call
