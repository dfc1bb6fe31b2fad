"""RedisIdempotencyStore against a real Redis (BANYAN_TEST_REDIS_URL).

Every test works under its own key prefix (the ``redis_prefix`` fixture deletes its keys
afterwards). If Redis does not answer, the tests fail; they are never skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from banyan_bus.idempotency import (
    DEFAULT_TTL,
    ClaimResult,
    Deduplicator,
    IdempotencyKeyBusy,
    IdempotencyStoreError,
    guard,
)
from banyan_bus.idempotency_redis import RedisIdempotencyStore


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisIdempotencyStore]:
    s = RedisIdempotencyStore(redis_url, prefix=redis_prefix)
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _claim_until(
    store: RedisIdempotencyStore, key: str, token: str, *, lease: float, within: float
) -> ClaimResult:
    """Claim repeatedly until not busy or ``within`` seconds passed; the last answer."""
    deadline = time.monotonic() + within
    while True:
        result = await store.claim(key, token=token, lease=lease)
        if result != "busy" or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(0.02)


# -- claim / done / busy ---------------------------------------------------------------------


async def test_same_key_claimed_five_times_has_one_winner(store: RedisIdempotencyStore) -> None:
    results = [await store.claim("k", token=f"t{i}", lease=30) for i in range(5)]
    assert results == ["claimed", "busy", "busy", "busy", "busy"]


async def test_same_event_five_times_causes_one_side_effect(
    store: RedisIdempotencyStore,
) -> None:
    side_effects = 0
    outcomes = []
    for _ in range(5):
        async with guard(store, "evt", lease=30) as outcome:
            outcomes.append(outcome)
            if outcome == "run":
                side_effects += 1
    assert side_effects == 1
    assert outcomes == ["run", "skip", "skip", "skip", "skip"]


async def test_many_concurrent_claims_have_exactly_one_winner(
    store: RedisIdempotencyStore,
) -> None:
    results = await asyncio.gather(*(store.claim("k", token=f"t{i}", lease=30) for i in range(50)))
    assert results.count("claimed") == 1
    assert results.count("busy") == 49


async def test_two_clients_racing_have_exactly_one_winner(
    redis_url: str, redis_prefix: str
) -> None:
    a = RedisIdempotencyStore(redis_url, prefix=redis_prefix)
    b = RedisIdempotencyStore(redis_url, prefix=redis_prefix)
    try:
        for round_ in range(10):
            key = f"k{round_}"
            results = await asyncio.gather(
                *(a.claim(key, token=f"a{i}", lease=30) for i in range(10)),
                *(b.claim(key, token=f"b{i}", lease=30) for i in range(10)),
            )
            assert results.count("claimed") == 1, results
    finally:
        await a.close()
        await b.close()


async def test_two_instances_racing_on_one_event_cause_one_side_effect(
    redis_url: str, redis_prefix: str
) -> None:
    """Two instances get the same event at once; the loser retries later and then skips."""
    side_effects = 0
    busy_seen = 0

    async def instance(store: RedisIdempotencyStore) -> str:
        nonlocal side_effects, busy_seen
        dedup: Deduplicator[object] = Deduplicator(store, group="emails", lease=30)
        async with asyncio.timeout(10):
            while True:
                try:
                    async with dedup.guard("send_welcome", "evt_1", object()) as outcome:
                        if outcome == "run":
                            await asyncio.sleep(0.1)  # the side effect takes a while
                            side_effects += 1
                        return outcome
                except IdempotencyKeyBusy:
                    busy_seen += 1
                    await asyncio.sleep(0.05)  # "retry later"

    a = RedisIdempotencyStore(redis_url, prefix=redis_prefix)
    b = RedisIdempotencyStore(redis_url, prefix=redis_prefix)
    try:
        outcomes = await asyncio.gather(instance(a), instance(b))
    finally:
        await a.close()
        await b.close()
    assert sorted(outcomes) == ["run", "skip"]
    assert side_effects == 1
    assert busy_seen >= 1


async def test_repeated_claim_by_the_same_token_keeps_the_claim(
    store: RedisIdempotencyStore,
) -> None:
    assert await store.claim("k", token="a", lease=30) == "claimed"
    assert await store.claim("k", token="a", lease=30) == "claimed"
    assert await store.claim("k", token="b", lease=30) == "busy"


# -- lease and ttl ---------------------------------------------------------------------------


async def test_claim_of_a_killed_worker_expires(store: RedisIdempotencyStore) -> None:
    assert await store.claim("k", token="killed", lease=0.3) == "claimed"
    # The worker dies: no complete, no release.
    started = time.monotonic()
    assert await store.claim("k", token="next", lease=30) == "busy"
    assert await _claim_until(store, "k", "next", lease=30, within=5) == "claimed"
    assert time.monotonic() - started >= 0.2  # it waited for the lease, not less


async def test_event_left_by_a_killed_worker_is_handled_after_the_lease(
    store: RedisIdempotencyStore,
) -> None:
    await store.claim("evt", token="killed", lease=0.3)  # what guard did in the dead process
    with pytest.raises(IdempotencyKeyBusy):
        async with guard(store, "evt"):
            pytest.fail("must not run while the dead worker's lease lasts")
    await asyncio.sleep(0.4)
    handled = False
    async with guard(store, "evt") as outcome:
        if outcome == "run":
            handled = True
    assert handled


async def test_done_is_remembered_for_its_ttl(
    store: RedisIdempotencyStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await store.claim("k", token="a", lease=30)
    assert await store.complete("k", token="a", ttl=0.3) is True
    assert await store.claim("k", token="b", lease=30) == "done"
    assert await _claim_until(store, "k", "b", lease=30, within=5) == "done"  # "done" ≠ busy
    await asyncio.sleep(0.4)
    assert await store.claim("k", token="b", lease=30) == "claimed"
    assert await raw.get(redis_prefix + "k") == "b"


async def test_default_ttl_is_set_on_the_done_key(
    store: RedisIdempotencyStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    async with guard(store, "k") as outcome:
        assert outcome == "run"
    assert await raw.get(redis_prefix + "k") == "done"
    pttl = await raw.pttl(redis_prefix + "k")
    assert DEFAULT_TTL * 1000 - 60_000 < pttl <= DEFAULT_TTL * 1000


async def test_claim_sets_the_lease_on_the_key(
    store: RedisIdempotencyStore, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    await store.claim("k", token="tok", lease=30)
    assert await raw.get(redis_prefix + "k") == "tok"
    assert 29_000 < await raw.pttl(redis_prefix + "k") <= 30_000


# -- release and retries -----------------------------------------------------------------------


async def test_release_lets_a_retry_claim(store: RedisIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=30)
    assert await store.release("k", token="a") is True
    assert await store.claim("k", token="b", lease=30) == "claimed"


async def test_handler_failing_once_then_succeeding_runs_its_side_effect_once(
    store: RedisIdempotencyStore,
) -> None:
    side_effects = 0
    attempts = 0

    async def deliver() -> None:
        nonlocal side_effects, attempts
        async with guard(store, "evt", lease=30) as outcome:
            if outcome == "skip":
                return
            attempts += 1
            if attempts == 1:
                raise ConnectionError("smtp down")
            side_effects += 1

    with pytest.raises(ConnectionError):
        await deliver()
    await deliver()  # the retry
    await deliver()  # a later duplicate
    assert attempts == 2
    assert side_effects == 1


# -- compare-and-set on the token ---------------------------------------------------------------


async def test_stale_token_complete_is_refused(store: RedisIdempotencyStore) -> None:
    await store.claim("k", token="slow", lease=0.2)
    assert await _claim_until(store, "k", "new", lease=30, within=5) == "claimed"
    assert await store.complete("k", token="slow", ttl=60) is False
    assert await store.claim("k", token="third", lease=30) == "busy"  # still "new"'s
    assert await store.complete("k", token="new", ttl=60) is True
    assert await store.claim("k", token="third", lease=30) == "done"


async def test_stale_token_release_is_refused(store: RedisIdempotencyStore) -> None:
    await store.claim("k", token="slow", lease=0.2)
    assert await _claim_until(store, "k", "new", lease=30, within=5) == "claimed"
    assert await store.release("k", token="slow") is False
    assert await store.claim("k", token="third", lease=30) == "busy"


async def test_release_never_undoes_done(store: RedisIdempotencyStore) -> None:
    await store.claim("k", token="a", lease=30)
    await store.complete("k", token="a", ttl=60)
    assert await store.release("k", token="a") is False
    assert await store.claim("k", token="b", lease=30) == "done"


async def test_complete_after_expiry_with_no_new_holder_records_done(
    store: RedisIdempotencyStore,
) -> None:
    await store.claim("k", token="slow", lease=0.1)
    await asyncio.sleep(0.2)
    assert await store.complete("k", token="slow", ttl=60) is True
    assert await store.claim("k", token="b", lease=30) == "done"


# -- clients and errors ------------------------------------------------------------------------


async def test_a_given_client_is_used_as_is_and_not_closed(
    redis_url: str, redis_prefix: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)  # bytes replies, not str
    try:
        store = RedisIdempotencyStore(prefix=redis_prefix, client=client)
        assert await store.claim("k", token="a", lease=30) == "claimed"
        assert await store.claim("k", token="b", lease=30) == "busy"
        assert await store.complete("k", token="a", ttl=60) is True
        assert await store.claim("k", token="b", lease=30) == "done"
        await store.close()
        assert await client.ping()  # still open: the store did not own it
    finally:
        await client.aclose()


async def test_prefixes_keep_stores_apart(redis_url: str, redis_prefix: str) -> None:
    a = RedisIdempotencyStore(redis_url, prefix=redis_prefix + "a:")
    b = RedisIdempotencyStore(redis_url, prefix=redis_prefix + "b:")
    try:
        assert await a.claim("k", token="x", lease=30) == "claimed"
        assert await b.claim("k", token="y", lease=30) == "claimed"
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_raises_a_clear_error_without_the_password() -> None:
    # Port 1 on localhost: nothing listens there, so the connection is refused at once.
    store = RedisIdempotencyStore("redis://app:s3cret@127.0.0.1:1/0", timeout=2)
    try:
        with pytest.raises(IdempotencyStoreError) as info:
            await store.claim("k", token="a", lease=30)
    finally:
        await store.close()
    message = str(info.value)
    assert "s3cret" not in message
    assert "127.0.0.1:1" in message
    assert "scripts/services.sh redis" in message
    assert isinstance(info.value.__cause__, redis.RedisError)
