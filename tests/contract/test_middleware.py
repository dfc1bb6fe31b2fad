"""Middleware around publish and handle (``banyan_bus.middleware``), on memory:// and amqp://.

One interface for both directions: the bus's middleware outermost in list order, then
the subscription's, then the handler; it can read and add headers, short-circuit, or
raise (a raise on consume is the handler's failure: retried, then dead-lettered). Log
context is bound around it. With no middleware nothing is wrapped at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from banyan_bus import Command, CommandHandler, Event, MessageBus, MessageContext, RetryPolicy
from banyan_bus.deadletter import DLQ_EXCEPTION_MESSAGE, DLQ_EXCEPTION_TYPE, DLQ_REASON
from banyan_bus.handlers import function_handler
from banyan_bus.middleware import MessageCall, Middleware, Next
from tests.support import wait_until


class CrateLabelled(Event):
    crate_id: str


class WeighCrate(Command):
    crate_id: str


def recorder(name: str, log: list[str]) -> Middleware:
    async def middleware(call: MessageCall, call_next: Next) -> object:
        log.append(f"{name}>{call.direction}")
        result = await call_next(call)
        log.append(f"{name}<{call.direction}")
        return result

    return middleware


async def test_bus_middleware_is_outermost_then_the_subscriptions_on_both_directions(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    log: list[str] = []
    bus = MessageBus(unique("crates"), bus_url, middleware=[recorder("a", log), recorder("b", log)])

    async def label(event: CrateLabelled) -> None:
        log.append("handler")

    await bus.subscribe(CrateLabelled, label, middleware=[recorder("c", log)])
    async with bus:
        await bus.publish(CrateLabelled(crate_id="k1"))
        # On RabbitMQ the delivery may overtake the publisher confirm: the two chains
        # interleave, each in its own order.
        publishing = [entry for entry in log if entry.endswith("publish")]
        assert publishing == ["a>publish", "b>publish", "b<publish", "a<publish"]
        await wait_until(lambda: "a<consume" in log, timeout=10, what="the consume chain")
    assert [entry for entry in log if not entry.endswith("publish")] == [
        "a>consume",
        "b>consume",
        "c>consume",
        "handler",
        "c<consume",
        "b<consume",
        "a<consume",
    ]


async def test_headers_added_on_publish_are_read_on_consume_and_added_for_the_handler(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    seen: list[tuple[object, object]] = []

    async def tenant(call: MessageCall, call_next: Next) -> object:
        if call.direction == "publish":
            assert call.outgoing is not None
            assert call.outgoing.headers is call.headers
            call.headers["x-tenant"] = "acme"
        else:
            assert call.context is not None
            call.headers["x-tenant-checked"] = f"yes:{call.headers.get('x-tenant')}"
        return await call_next(call)

    async def label(event: CrateLabelled, ctx: MessageContext) -> None:
        seen.append((ctx.headers.get("x-tenant"), ctx.headers.get("x-tenant-checked")))

    bus = MessageBus(unique("tenants"), bus_url, middleware=[tenant])
    await bus.subscribe(CrateLabelled, label)
    async with bus:
        await bus.publish(CrateLabelled(crate_id="k2"))
        await wait_until(lambda: bool(seen), timeout=10, what="the handler")
    assert seen == [("acme", "yes:acme")]


async def test_short_circuit_skips_the_handler_and_acks_or_sends_nothing(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    handled: list[str] = []
    skipped: list[str] = []

    async def drop_test_crates(call: MessageCall, call_next: Next) -> object:
        if isinstance(call.message, CrateLabelled) and call.message.crate_id.startswith("test-"):
            skipped.append(f"{call.direction}:{call.message.crate_id}")
            return None
        return await call_next(call)

    async def label(event: CrateLabelled) -> None:
        handled.append(event.crate_id)

    publisher = MessageBus(unique("sender"), bus_url, middleware=[drop_test_crates])
    consumer = MessageBus(unique("receiver"), bus_url)
    sub = await consumer.subscribe(CrateLabelled, label, middleware=[drop_test_crates])
    async with consumer, publisher:
        await publisher.publish(CrateLabelled(crate_id="test-1"))  # never sent
        await consumer.publish(CrateLabelled(crate_id="test-2"))  # sent, skipped on consume
        await consumer.publish(CrateLabelled(crate_id="real-1"))
        await wait_until(lambda: handled == ["real-1"], timeout=10, what="real-1 handled")
        await wait_until(lambda: len(skipped) == 2, timeout=10, what="test-2 skipped")
        assert await consumer.wait_idle(5)
        await asyncio.sleep(0.2)
        queue = await consumer.transport.queue_state(sub.queue_name)
        dlq = await consumer.transport.queue_state(sub.dlq_name)
    assert skipped == ["publish:test-1", "consume:test-2"]
    assert handled == ["real-1"]
    assert queue is not None
    assert queue.messages == 0  # the short-circuited one was acked, not left or requeued
    assert dlq is not None
    assert dlq.messages == 0


class Forbidden(Exception):
    pass


async def test_a_raise_in_consume_middleware_is_retried_then_dead_lettered(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    attempts: list[int] = []

    async def auth(call: MessageCall, call_next: Next) -> object:
        assert call.context is not None
        attempts.append(call.context.attempt)
        raise Forbidden("crate k3 is not yours")

    async def label(event: CrateLabelled) -> None:
        raise AssertionError("the handler must not run")

    bus = MessageBus(unique("guarded"), bus_url)
    sub = await bus.subscribe(
        CrateLabelled, label, middleware=[auth], retry=RetryPolicy(immediate=2, delayed=0)
    )
    async with bus:
        await bus.publish(CrateLabelled(crate_id="k3"))
        dead = None
        for _ in range(200):
            dead = await bus.transport.get(sub.dlq_name)
            if dead is not None:
                break
            await asyncio.sleep(0.05)
        assert dead is not None, "nothing reached the DLQ"
        await dead.ack()
    assert attempts == [1, 2, 3]
    assert dead.headers[DLQ_REASON] == "handler-failed"
    assert str(dead.headers[DLQ_EXCEPTION_TYPE]).endswith("Forbidden")
    assert "not yours" in str(dead.headers[DLQ_EXCEPTION_MESSAGE])


async def test_middleware_runs_inside_the_handlers_log_context(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bound: list[dict[str, object]] = []

    async def look(call: MessageCall, call_next: Next) -> object:
        if call.direction == "consume":
            bound.append(dict(structlog.contextvars.get_contextvars()))
        return await call_next(call)

    async def label(event: CrateLabelled) -> None:
        pass

    bus = MessageBus(unique("logged"), bus_url, middleware=[look])
    await bus.subscribe(CrateLabelled, label)
    async with bus:
        message_id = await bus.publish(CrateLabelled(crate_id="k4"))
        await wait_until(lambda: len(bound) == 1, timeout=10, what="the middleware")
    [fields] = bound
    assert fields["event_id"] == message_id
    assert fields["message_type"] == CrateLabelled.__message_type__
    assert str(fields["handler"]).endswith("label")
    assert fields["attempt"] == 1


@CommandHandler(WeighCrate, middleware=[])
class WeighCrateHandler:
    async def handle(self, command: WeighCrate) -> int:
        return len(command.crate_id)


async def test_command_handlers_run_through_the_bus_middleware_and_keep_their_result(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    log: list[str] = []

    async def double(call: MessageCall, call_next: Next) -> object:
        log.append(call.message_type)
        result = await call_next(call)
        assert isinstance(result, int)
        return result * 2

    owner = MessageBus(unique("scales"), bus_url, middleware=[double])
    owner.include(WeighCrateHandler)
    async with owner:
        assert await owner.send(WeighCrate(crate_id="abc"), timeout=10) == 6
    assert log == [WeighCrate.__message_type__]


async def test_no_middleware_wraps_nothing(memory_url: str, unique: Callable[[str], str]) -> None:
    """The zero-cost promise: without middleware the engine runs the handler it always ran,
    and publish calls the transport directly."""

    async def label(event: CrateLabelled) -> None:
        pass

    bus = MessageBus(unique("plain"), memory_url)
    sub = await bus.subscribe(CrateLabelled, label)
    [spec] = sub.handlers
    plain = function_handler(CrateLabelled, label)
    assert spec.invoke.__qualname__ == plain.invoke.__qualname__
    assert "middleware" not in spec.invoke.__qualname__
    async with bus:
        assert bus._started_publisher()._chain is None
