"""The broker's own view of what a service declares (management API), against DESIGN.md §3."""

from __future__ import annotations

import pytest

from banyan_bus import Command, CommandHandler, Event, MessageBus, TopologyMismatch
from banyan_bus.delay import DELIVERY_EXCHANGE, level_name
from tests.brokers import list_bindings, list_exchanges, list_queues, vhost_from_url


class LanternLit(Event):
    lantern_id: str


class RingBell(Command):
    times: int


@CommandHandler(RingBell)
class RingBellHandler:
    async def handle(self, command: RingBell) -> int:
        return command.times


async def _noop(event: LanternLit) -> None:
    pass


async def test_names_and_arguments_match_the_design(amqp_url: str) -> None:
    bus = MessageBus("lighthouse", amqp_url)
    await bus.subscribe(LanternLit, _noop)  # group defaults to the service name
    await bus.subscribe(LanternLit, _noop, subscription_group="harbour", queue_type="classic")
    await bus.subscribe(LanternLit, _noop, subscription_group="fleet", ordered=True, partitions=2)
    bus.include(RingBellHandler)
    async with bus:
        pass
    vhost = vhost_from_url(amqp_url)
    exchanges = {e["name"]: e for e in list_exchanges(vhost)}
    queues = {q["name"]: q for q in list_queues(vhost)}
    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in list_bindings(vhost)
    }

    root = "exchange.platform.events"
    assert exchanges[root]["type"] == "topic"
    assert exchanges[root]["durable"] is True
    for group in ("lighthouse", "harbour"):
        name = f"{root}.{group}.lanternlit"
        assert exchanges[name]["type"] == "fanout"
        assert queues[name]["durable"] is True
        assert (name, name, "queue", "") in bindings
        assert (root, name, "exchange", "lanternlit") in bindings
        assert f"dlq.{name}" in queues
        args = queues[name]["arguments"]
        assert args["x-dead-letter-exchange"] == ""
        assert args["x-dead-letter-routing-key"] == f"dlq.{name}"
    quorum = queues[f"{root}.lighthouse.lanternlit"]["arguments"]
    assert quorum["x-queue-type"] == "quorum"
    assert quorum["x-delivery-limit"] == 20
    assert "x-max-priority" not in quorum
    classic = queues[f"{root}.harbour.lanternlit"]["arguments"]
    assert classic["x-queue-type"] == "classic"
    assert classic["x-max-priority"] == 3

    # Ordered: the type's exchange feeds the group's one ordered stream (all its types).
    ordered = f"{root}.fleet.lanternlit"
    stream = f"{root}.fleet.ordered-stream"
    assert exchanges[ordered]["type"] == "x-consistent-hash"
    assert (ordered, stream, "exchange", "1") in bindings
    assert exchanges[stream]["type"] == "x-consistent-hash"
    assert exchanges[stream]["arguments"] == {"hash-header": "x-partition-key"}
    assert exchanges[f"{stream}.dlx"]["type"] == "topic"
    assert (f"{stream}.dlx", f"dlq.{ordered}", "queue", "#.lanternlit") in bindings
    for index in range(2):
        partition = queues[f"{stream}.p{index}"]
        assert partition["arguments"]["x-single-active-consumer"] is True
        assert partition["arguments"]["x-dead-letter-exchange"] == f"{stream}.dlx"
        assert (stream, f"{stream}.p{index}", "queue", "1") in bindings
    assert f"{ordered}.p0" not in queues

    # The delay levels: 28 quorum queues, level n holding 2^n s, dead-lettering down.
    for level in (0, 5, 27):
        queue = queues[level_name(level)]["arguments"]
        assert queue["x-message-ttl"] == 2**level * 1000
        assert queue["x-queue-type"] == "quorum"
        expected = level_name(level - 1) if level else DELIVERY_EXCHANGE
        assert queue["x-dead-letter-exchange"] == expected
    assert len([q for q in queues if q.startswith("banyan.delay.level.")]) == 28
    # Retries reach a group's own exchange from the delivery exchange, and only it.
    retry_routes = {(s, d) for s, d, _, _ in bindings if s == DELIVERY_EXCHANGE}
    assert (DELIVERY_EXCHANGE, f"{root}.lighthouse.lanternlit") in retry_routes
    assert (DELIVERY_EXCHANGE, root) in retry_routes  # delayed publishes

    commands = "exchange.platform.commands"
    assert exchanges[commands]["type"] == "direct"
    assert (commands, f"{commands}.ringbell", "queue", "ringbell") in bindings


async def test_redeclaring_is_idempotent_and_a_mismatch_names_both_sides(amqp_url: str) -> None:
    first = MessageBus("lighthouse", amqp_url)
    await first.subscribe(LanternLit, _noop)
    async with first:
        pass
    again = MessageBus("lighthouse", amqp_url)
    await again.subscribe(LanternLit, _noop)
    async with again:
        pass
    other = MessageBus("lighthouse", amqp_url, queue_type="classic")
    await other.subscribe(LanternLit, _noop)
    with pytest.raises(TopologyMismatch) as info:
        await other.start()
    text = str(info.value)
    assert "exchange.platform.events.lighthouse.lanternlit" in text
    assert "quorum" in text
    assert "classic" in text
