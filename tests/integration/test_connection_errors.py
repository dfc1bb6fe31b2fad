"""What a user sees when the connection cannot be made, and the connection defaults."""

from __future__ import annotations

import pytest
from yarl import URL

from banyan_bus.errors import BrokerUnreachable
from banyan_bus.transport.amqp import AmqpTransport
from banyan_bus.transport.amqp_connection import DEFAULT_HEARTBEAT


async def test_a_wrong_vhost_reports_the_brokers_reason_and_hides_the_password() -> None:
    transport = AmqpTransport("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", connect_timeout=5)
    with pytest.raises(BrokerUnreachable) as caught:
        await transport.connect()
    message = str(caught.value)
    assert "NOT_ALLOWED - vhost no-such-vhost not found" in message
    assert "amqp://guest:***@127.0.0.1:5672/no-such-vhost" in message
    assert "InvalidFrameError" not in message
    assert ":guest@" not in message


async def test_the_default_heartbeat_is_short_and_the_url_can_override_it(amqp_url: str) -> None:
    transport = AmqpTransport(amqp_url)
    assert "?" not in transport.display_url  # the default is not shown as if the user wrote it
    await transport.connect()
    try:
        assert transport._conn().transport.connection.heartbeat_timeout == DEFAULT_HEARTBEAT
    finally:
        await transport.close()
    assert DEFAULT_HEARTBEAT <= 10  # a dead peer is noticed within ~30 s, not ~3 minutes
    own = str(URL(amqp_url).update_query(heartbeat=20))
    transport = AmqpTransport(own)
    await transport.connect()
    try:
        assert transport._conn().transport.connection.heartbeat_timeout == 20
        assert transport.display_url.endswith("?heartbeat=20")  # as the user wrote it
    finally:
        await transport.close()
