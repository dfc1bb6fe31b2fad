"""Transports: the broker connection behind a ``MessageBus`` (``amqp://`` or ``memory://``)."""

from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Consumer,
    Delivery,
    OutgoingMessage,
    QueueState,
    Transport,
)

__all__ = [
    "DEFAULT_EXCHANGE",
    "Consumer",
    "Delivery",
    "OutgoingMessage",
    "QueueState",
    "Transport",
]
