"""A large plan on RabbitMQ goes over a few channels at once (``amqp_topology``), within
``channel_max``, and a refusal in it is still that declaration's, in our words."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from yarl import URL

from banyan_bus.declarations import BindingDecl, Declaration, ExchangeDecl, QueueDecl, apply
from banyan_bus.errors import TopologyMismatch
from banyan_bus.transport.amqp import AmqpTransport
from banyan_bus.transport.base import Arguments, ExchangeType, OutgoingMessage

CLASSIC: dict[str, object] = {"x-queue-type": "classic"}


class CountingTransport(AmqpTransport):
    """Counts the declarations in flight at once."""

    in_flight = 0
    most_in_flight = 0

    @asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None:
        async with self._counted():
            await super().declare_exchange(name, type, durable=durable, arguments=arguments)

    async def declare_queue(
        self, name: str, *, durable: bool = True, arguments: Arguments | None = None
    ) -> None:
        async with self._counted():
            await super().declare_queue(name, durable=durable, arguments=arguments)

    async def bind_queue(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments | None = None
    ) -> None:
        async with self._counted():
            await super().bind_queue(queue, exchange, routing_key, arguments)

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        async with self._counted():
            await super().bind_exchange(destination, source, routing_key, arguments)


def _plan(groups: int, prefix: str = "") -> list[Declaration]:
    plan: list[Declaration] = [ExchangeDecl("batch.root", "topic")]
    for g in range(groups):
        plan += [
            QueueDecl(f"{prefix}dlq{g}", CLASSIC),
            ExchangeDecl(f"{prefix}ex{g}", "fanout"),
            QueueDecl(f"{prefix}q{g}", CLASSIC),
            BindingDecl(f"{prefix}ex{g}", f"{prefix}q{g}", "queue"),
            BindingDecl("batch.root", f"{prefix}ex{g}", "exchange", f"{prefix}key{g}"),
        ]
    return plan


async def test_a_large_plan_is_declared_side_by_side_within_channel_max(amqp_url: str) -> None:
    # 3 channels of the transport's own: (10 - 3) // 2 = 3 more for the batch at most.
    transport = CountingTransport(str(URL(amqp_url).update_query(channel_max=10)))
    await transport.connect()
    try:
        await apply(transport, _plan(40))
        assert transport.most_in_flight == 3
        assert transport._topology_channels._opened == []  # the batch's channels are closed
        for g in (0, 17, 39):
            assert await transport.queue_state(f"q{g}") is not None
        await transport.publish("batch.root", "key17", OutgoingMessage(body=b"x", message_id="m"))
        state = await transport.queue_state("q17")
        assert state is not None
        assert state.messages == 1
    finally:
        await transport.close()


async def test_a_refusal_in_a_batch_names_the_queue_and_the_next_batch_works(
    amqp_url: str,
) -> None:
    transport = CountingTransport(amqp_url)
    await transport.connect()
    try:
        await transport.declare_queue("q23", arguments={**CLASSIC, "x-max-length": 5})
        with pytest.raises(TopologyMismatch) as info:
            await apply(transport, _plan(40))
        assert transport.most_in_flight > 1
        assert info.value.name == "q23"
        assert "x-max-length" in str(info.value)
        assert info.value.requested == CLASSIC
        # Declarations before the refusal were made; the connection and the next batch work.
        assert await transport.queue_state("q3") is not None
        await apply(transport, _plan(40, prefix="again-"))
        assert await transport.queue_state("again-q39") is not None
    finally:
        await transport.close()
