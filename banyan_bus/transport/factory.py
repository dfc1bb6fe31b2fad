"""The transport for a bus URL: ``amqp(s)://`` for RabbitMQ, ``memory://`` in process.

Both transports are imported only when asked for, so a service on
``memory://`` (tests, a laptop) never imports aio-pika.
"""

from __future__ import annotations

import ssl

from banyan_bus.errors import ConfigurationError
from banyan_bus.transport.base import Transport
from banyan_bus.transport.url import mask_url


def make_transport(
    url: str,
    *,
    name: str,
    publish_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Transport:
    """The transport for ``url``'s scheme: ``amqp(s)://`` or ``memory://``.

    ``name`` names the connection on the broker (the management UI shows it);
    ``publish_timeout`` is how long a publish waits for the broker's confirm;
    ``ssl_context`` replaces the URL's TLS options (RabbitMQ only).
    Any other scheme raises ``ConfigurationError``.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("amqp", "amqps"):
        from banyan_bus.transport.amqp import AmqpTransport

        return AmqpTransport(
            url, name=name, publish_timeout=publish_timeout, ssl_context=ssl_context
        )
    if scheme == "memory":
        from banyan_bus.transport.memory import MemoryTransport

        return MemoryTransport(url)
    raise ConfigurationError(
        f"unsupported bus URL {mask_url(url)!r}: use amqp://user:pass@host:5672/vhost "
        f"(or amqps://) for RabbitMQ, or memory:// for the in-process broker."
    )
