"""The ``memory://`` transport: an in-process emulation of a RabbitMQ 3.10 broker.

Everything above the transport seam is written in AMQP nouns, so the embedded
default transport emulates the broker instead of short-cutting the bus: the
same exchanges, queues and bindings route the same messages, queue arguments
(TTL, dead-lettering, max-length, priority, delivery limit, single active
consumer) act as RabbitMQ's do, and deliveries settle like AMQP deliveries.
A topology or retry bug therefore shows on ``memory://`` as it would on a real
broker, and users can unit-test handlers without one. Its claims about
RabbitMQ are tested against RabbitMQ (``tests/transport``).

One room per concept, stacked one way (each imports only those below it)::

    transport   the Transport seam adapter (MemoryTransport)
    broker      the broker (a vhost): tables, routing, dead-lettering; the registry
    delivery    deliveries, consumers, connections
    queue       a queue's messages, limits, TTL and dispatch
    exchange    exchange types and bindings     death   x-death headers, cycles
"""

from banyan_bus.transport.memory.broker import (
    SCHEME,
    MemoryBroker,
    drop_broker,
    get_broker,
    reset_brokers,
)
from banyan_bus.transport.memory.delivery import MemoryDelivery
from banyan_bus.transport.memory.exchange import topic_matches
from banyan_bus.transport.memory.transport import MemoryTransport

__all__ = [
    "SCHEME",
    "MemoryBroker",
    "MemoryDelivery",
    "MemoryTransport",
    "drop_broker",
    "get_broker",
    "reset_brokers",
    "topic_matches",
]
