"""SubscriptionOptions: one frozen value, checked once, that every way of subscribing builds."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from banyan_bus import (
    Command,
    CommandHandler,
    ConfigurationError,
    Event,
    EventHandler,
    HandlerError,
    MessageBus,
    RetryPolicy,
)
from banyan_bus.subscription import (
    BUS_DEFAULT,
    OPTION_NAMES,
    REQUEST_OPTIONS,
    SubscriptionOptions,
)


class TorchKindled(Event):
    lantern_id: str


class ExtinguishLantern(Command):
    lantern_id: str


async def _noop(event: TorchKindled) -> None:
    return None


def test_defaults_are_the_documented_ones() -> None:
    options = SubscriptionOptions()
    assert options.subscription_group is None  # the service
    assert options.concurrency == 10
    assert options.prefetch_count == 30  # 3 x concurrency
    assert options.auto_ack is True
    assert options.timeout is BUS_DEFAULT
    assert options.handler_timeout(120.0) == 120.0  # the bus's
    assert options.handler_timeout(None) is None
    assert options.partition_count == 1
    assert not options.deduplicated
    assert SubscriptionOptions(concurrency=4).prefetch_count == 12
    assert SubscriptionOptions(concurrency=4, prefetch=5).prefetch_count == 5
    assert SubscriptionOptions(ordered=True).partition_count == 4
    assert SubscriptionOptions(ordered=True, partitions=2).partition_count == 2
    assert SubscriptionOptions(timeout=None).handler_timeout(120.0) is None
    assert SubscriptionOptions(idempotency_key=lambda e: "k").deduplicated


def test_is_frozen() -> None:
    options = SubscriptionOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.concurrency = 3  # type: ignore[misc]


def test_option_names_are_subscribes_keyword_arguments_with_its_defaults() -> None:
    # subscribe() spells the options out for users and type checkers; this keeps
    # that spelling and the one value from drifting apart.
    params = {
        p.name: p.default
        for p in inspect.signature(MessageBus.subscribe).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    assert set(params) == OPTION_NAMES
    defaults = {f.name: f.default for f in dataclasses.fields(SubscriptionOptions)}
    assert params == defaults
    assert REQUEST_OPTIONS < OPTION_NAMES


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an int >= 1, got 0"),
        ({"concurrency": True}, "concurrency must be an int >= 1"),
        ({"concurrency": 2.5}, "concurrency must be an int >= 1"),
        ({"prefetch": 0}, "prefetch must be an int from 1 to 65535"),
        ({"prefetch": 70000}, "unbounded prefetch is refused"),
        ({"concurrency": 30000}, r"prefetch must be an int .*got 90000"),
        ({"timeout": 0}, r"timeout must be > 0 seconds or None, got 0"),
        ({"timeout": "5"}, r"timeout must be > 0 seconds or None"),
        ({"queue_type": "stream"}, "queue_type must be 'quorum' or 'classic'"),
        ({"max_length": 0}, "max_length must be a positive int"),
        ({"partitions": 2}, r"partitions= only applies with ordered=True"),
        ({"ordered": True, "partitions": 0}, "partitions must be an int >= 1"),
        ({"idempotent": True, "auto_ack": False}, "idempotent handlers need auto_ack=True"),
        ({"idempotency_key": "user_id"}, "idempotency_key must be a function of the event"),
        ({"subscription_group": "a.b"}, "subscription_group 'a.b' is invalid"),
        ({"retry": 3}, "retry must be a RetryPolicy"),
        ({"auto_ack": "yes"}, "auto_ack must be True or False"),
    ],
)
def test_a_wrong_option_is_refused_naming_it(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SubscriptionOptions(**options)


def test_from_options_refuses_unknown_names_and_lists_the_valid_ones() -> None:
    with pytest.raises(HandlerError, match=r"unknown option\(s\) \['concurency'\]; valid: "):
        SubscriptionOptions.from_options({"concurency": 5})
    with pytest.raises(HandlerError, match=r"^Owner: unknown option\(s\) \['ordered'\]"):
        SubscriptionOptions.from_options({"ordered": True}, allowed=REQUEST_OPTIONS, owner="Owner")
    with pytest.raises(ConfigurationError, match=r"^Owner: concurrency must be an int >= 1"):
        SubscriptionOptions.from_options({"concurrency": 0}, owner="Owner")
    assert SubscriptionOptions.from_options({"concurrency": 5}) == SubscriptionOptions(
        concurrency=5
    )


def test_class_decorators_check_their_options_when_the_class_is_defined() -> None:
    with pytest.raises(ConfigurationError, match="BadLanterns: prefetch must be an int"):

        @EventHandler(TorchKindled, prefetch=0)
        class BadLanterns:
            async def handle(self, event: TorchKindled) -> None: ...

    with pytest.raises(HandlerError, match=r"Extinguisher: unknown option\(s\)"):

        @CommandHandler(ExtinguishLantern, subscription_group="ops")
        class Extinguisher:
            async def handle(self, command: ExtinguishLantern) -> None: ...


def test_bus_handler_refuses_unknown_options_at_the_decorator() -> None:
    bus = MessageBus("lanterns")
    with pytest.raises(HandlerError, match=r"unknown option\(s\) \['group'\]"):
        bus.handler(TorchKindled, group="x")


async def test_every_way_of_subscribing_builds_the_same_subscription() -> None:
    options: dict[str, Any] = {
        "concurrency": 3,
        "timeout": 7.0,
        "queue_type": "classic",
        "max_length": 100,
    }
    by_call = MessageBus("lanterns")
    await by_call.subscribe(TorchKindled, _noop, subscription_group="g", **options)

    by_decorator = MessageBus("lanterns")
    by_decorator.handler(TorchKindled, subscription_group="g", **options)(_noop)

    @EventHandler(TorchKindled, subscription_group="g", **options)
    class Lanterns:
        async def handle(self, event: TorchKindled) -> None: ...

    by_class = MessageBus("lanterns")
    by_class.include(Lanterns)

    def shape(bus: MessageBus) -> tuple[Any, ...]:
        [sub] = bus.subscriptions
        return (
            sub.group,
            sub.message_type,
            sub.concurrency,
            sub.prefetch,
            sub.auto_ack,
            sub.timeout,
            sub.queue,
            sub.ordered,
            sub.partitions,
            sub.retry,
        )

    assert shape(by_call) == shape(by_decorator) == shape(by_class)
    assert shape(by_call)[:6] == ("g", "TorchKindled", 3, 9, True, 7.0)
    assert shape(by_call)[6].queue_type == "classic"
    assert shape(by_call)[6].max_length == 100


async def test_the_bus_fills_in_what_the_options_leave_open() -> None:
    policy = RetryPolicy(immediate=2, delayed=0)
    bus = MessageBus("lanterns", queue_type="classic", handler_timeout=5, retry=policy)
    sub = await bus.subscribe(TorchKindled, _noop, idempotent=True)
    assert sub.group == "lanterns"
    assert sub.queue.queue_type == "classic"
    assert sub.timeout == 5
    assert sub.retry is policy
    assert sub.dedup is not None
    assert sub.dedup.lease == 5 * (1 + 2) + 30  # outlives every immediate attempt

    own = RetryPolicy.none()
    sub = await bus.subscribe(
        TorchKindled, _noop, subscription_group="own", queue_type="quorum", timeout=None, retry=own
    )
    assert (sub.queue.queue_type, sub.timeout, sub.retry, sub.dedup) == ("quorum", None, own, None)


async def test_handlers_of_one_group_must_agree_on_the_queue() -> None:
    bus = MessageBus("lanterns")

    async def other(event: TorchKindled) -> None:
        return None

    await bus.subscribe(TorchKindled, _noop, queue_type="classic")
    with pytest.raises(ConfigurationError, match="share its queue, so they must agree"):
        await bus.subscribe(TorchKindled, other, queue_type="quorum")
    sub = await bus.subscribe(TorchKindled, other, queue_type="classic")
    assert [h.name.rsplit(".", 1)[-1] for h in sub.handlers] == ["_noop", "other"]


async def test_command_handlers_take_concurrency_and_timeout_from_the_options() -> None:
    @CommandHandler(ExtinguishLantern, concurrency=2)
    class Extinguish:
        async def handle(self, command: ExtinguishLantern) -> None: ...

    bus = MessageBus("lantern-ops", handler_timeout=9)
    bus.include(Extinguish)
    assert bus.owned_requests == ("ExtinguishLantern",)
    [(_, options)] = bus._in.commands.values()
    assert options.concurrency == 2
    assert options.handler_timeout(bus.handler_timeout) == 9
