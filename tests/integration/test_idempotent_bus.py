"""Effectively-once through the whole bus: real RabbitMQ, real Redis as the shared store."""

from __future__ import annotations

import asyncio

from banyan_bus import Event, MessageBus, MessageContext, RedisIdempotencyStore, RetryPolicy
from banyan_bus.idempotency import idempotency_key
from tests.support import wait_until


class WelcomeRequested(Event):
    user_id: str


def store(redis_url: str, prefix: str) -> RedisIdempotencyStore:
    return RedisIdempotencyStore(redis_url, prefix=prefix)


async def test_same_event_five_times_one_side_effect(
    amqp_url: str, redis_url: str, redis_prefix: str, unique
) -> None:
    sent: list[str] = []

    async def send_welcome(event: WelcomeRequested) -> None:
        sent.append(event.user_id)

    bus = MessageBus(unique("mailer"), amqp_url, idempotency_store=store(redis_url, redis_prefix))
    await bus.subscribe(WelcomeRequested, send_welcome, idempotent=True)
    async with bus:
        for _ in range(5):
            await bus.publish(WelcomeRequested(user_id="u1"), message_id="evt_welcome_u1")
        await wait_until(lambda: len(sent) >= 1)
        await asyncio.sleep(0.5)
        await bus.wait_idle(5)
    assert sent == ["u1"]


async def test_two_instances_racing_cause_one_side_effect(
    amqp_url: str, redis_url: str, redis_prefix: str, unique
) -> None:
    sent: list[str] = []

    async def send_welcome(event: WelcomeRequested) -> None:
        await asyncio.sleep(0.05)  # both copies are in flight at once
        sent.append(event.user_id)

    # Two groups would each get a copy; the race is inside one group, so send the
    # duplicates from two publishers to one group served by two instances.
    service = unique("mailer")
    instances = [
        MessageBus(service, amqp_url, idempotency_store=store(redis_url, redis_prefix))
        for _ in range(2)
    ]
    for bus in instances:
        await bus.subscribe(WelcomeRequested, send_welcome, idempotent=True, prefetch=1)
    async with instances[0], instances[1]:
        await asyncio.gather(
            *(
                instances[i % 2].publish(
                    WelcomeRequested(user_id=f"u{n}"), message_id=f"evt_race_{n}"
                )
                for n in range(20)
                for i in range(2)
            )
        )
        await wait_until(lambda: len(sent) >= 20, timeout=30)
        await asyncio.sleep(6)  # a "busy" copy comes back after 5 s and must be skipped
        for bus in instances:
            await bus.wait_idle(5)
    assert sorted(sent) == sorted(f"u{n}" for n in range(20))


async def test_failed_then_retried_runs_the_side_effect_once(
    amqp_url: str, redis_url: str, redis_prefix: str, unique
) -> None:
    effects: list[int] = []
    attempts: list[int] = []

    async def handle(event: WelcomeRequested, ctx: MessageContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("smtp down")
        effects.append(ctx.attempt)

    bus = MessageBus(
        unique("mailer"),
        amqp_url,
        idempotency_store=store(redis_url, redis_prefix),
        retry=RetryPolicy(immediate=0, delayed=2, base=1, jitter=0),
    )
    await bus.subscribe(WelcomeRequested, handle, idempotent=True)
    async with bus:
        await bus.publish(WelcomeRequested(user_id="u1"), message_id="evt_retry_u1")
        await wait_until(lambda: len(effects) == 1, timeout=10)
        await bus.publish(WelcomeRequested(user_id="u1"), message_id="evt_retry_u1")
        await asyncio.sleep(0.5)
        await bus.wait_idle(5)
    assert attempts == [1, 2]
    assert effects == [2]


async def test_a_dead_workers_claim_expires_and_the_event_is_handled(
    amqp_url: str, redis_url: str, redis_prefix: str, unique
) -> None:
    sent: list[str] = []
    group = unique("mailer")

    async def send_welcome(event: WelcomeRequested) -> None:
        sent.append(event.user_id)

    redis_store = store(redis_url, redis_prefix)
    handler_name = f"{send_welcome.__module__}.{send_welcome.__qualname__}"
    # A worker claimed the key and died: its claim (lease 1 s) is still there.
    key = idempotency_key(group, handler_name, "evt_orphan")
    assert await redis_store.claim(key, token="dead-worker", lease=1.0) == "claimed"
    bus = MessageBus(group, amqp_url, idempotency_store=redis_store)
    await bus.subscribe(WelcomeRequested, send_welcome, idempotent=True)
    async with bus:
        await bus.publish(WelcomeRequested(user_id="u9"), message_id="evt_orphan")
        # "busy" first: the message comes back through the delay levels after 5 s.
        await wait_until(lambda: sent == ["u9"], timeout=15)
        await bus.wait_idle(5)
    assert sent == ["u9"]
