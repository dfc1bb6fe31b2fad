"""``mask_url``: the one place a URL's password is hidden for messages and logs."""

from __future__ import annotations

import pytest

from banyan_bus.transport.url import mask_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F"),
        (
            "amqps://user:s3cret@Broker.example/vhost?heartbeat=5",
            "amqps://user:***@Broker.example/vhost?heartbeat=5",
        ),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://user:p@ss@host/", "amqp://user:***@host/"),
        ("postgresql://u:p@db/app?x=a@b", "postgresql://u:***@db/app?x=a@b"),
        ("amqp://u:a@n1:5672/,amqp://u:b@n2:5672/", "amqp://u:***@n1:5672/,amqp://u:***@n2:5672/"),
    ],
)
def test_the_password_is_masked_and_the_rest_kept(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "amqp://localhost/",
        "amqps://user@host/",
        "memory://",
        "memory://demo",
        "amqp://h/?to=a@b",
        "[::1",
    ],
)
def test_a_url_without_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url
