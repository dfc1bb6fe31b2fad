"""One channel per consumed queue: past the broker's channel_max RabbitMQ would close the
whole connection, so the transport refuses the one subscription that does not fit, clearly,
and everything already running goes on."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from banyan_bus.errors import ConfigurationError
from banyan_bus.transport.amqp import AmqpTransport
from banyan_bus.transport.amqp_connection import DEFAULT_CHANNEL_MAX
from banyan_bus.transport.base import Delivery, OutgoingMessage


async def test_a_consumer_past_channel_max_is_refused_and_the_connection_lives_on(
    amqp_url: str,
) -> None:
    url = str(URL(amqp_url).update_query(channel_max=8))
    transport = AmqpTransport(url)
    await transport.connect()
    got: list[bytes] = []

    async def on_delivery(delivery: Delivery) -> None:
        got.append(delivery.body)
        await delivery.ack()

    try:
        for i in range(5):  # 3 channels of the transport's own + 5 consumers = 8
            await transport.declare_queue(f"lane-{i}", arguments={"x-queue-type": "classic"})
            await transport.consume(f"lane-{i}", on_delivery, prefetch=1)
        await transport.declare_queue("lane-5", arguments={"x-queue-type": "classic"})
        with pytest.raises(ConfigurationError, match=r"lane-5.*8 channels.*channel_max"):
            await transport.consume("lane-5", on_delivery, prefetch=1)
        # The connection and the five consumers are untouched.
        for i in range(5):
            await transport.publish(
                "", f"lane-{i}", OutgoingMessage(body=f"m{i}".encode(), message_id=f"m{i}")
            )
        for _ in range(100):
            if len(got) == 5:
                break
            await asyncio.sleep(0.05)
        assert sorted(got) == [f"m{i}".encode() for i in range(5)]
    finally:
        await transport.close()


def test_channel_max_in_the_url_is_checked() -> None:
    assert AmqpTransport("amqp://localhost/")._channel_max == DEFAULT_CHANNEL_MAX == 2047
    with pytest.raises(ConfigurationError, match="channel_max"):
        AmqpTransport("amqp://localhost/?channel_max=lots")
