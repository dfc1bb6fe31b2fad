"""banyan_bus: typed service-to-service events over RabbitMQ.

Declare contracts, publish them with one call, handle them in functions or
classes; every subscribing service gets its own copy, failures retry with
delays and end in a dead-letter queue. ``memory://`` is the embedded default.
"""

from banyan_bus.bus import MessageBus
from banyan_bus.context import MessageContext, current_context
from banyan_bus.contracts import Command, Event, Message, Query
from banyan_bus.di import Logger
from banyan_bus.errors import (
    BanyanError,
    BrokerUnreachable,
    BusCapacityExceeded,
    ConcurrencyError,
    ConfigurationError,
    ContractError,
    DependencyError,
    EventStoreError,
    HandlerError,
    IdempotencyKeyBusy,
    IdempotencyStoreError,
    PayloadTooLarge,
    PluginMissing,
    PublishError,
    RemoteHandlerError,
    RequestTimeout,
    SettleError,
    TopologyError,
    TopologyMismatch,
    Unroutable,
)
from banyan_bus.handlers import CommandHandler, EventHandler, QueryHandler
from banyan_bus.idempotency import IdempotencyStore, MemoryIdempotencyStore
from banyan_bus.idempotency_redis import RedisIdempotencyStore
from banyan_bus.retry import RetryPolicy
from banyan_bus.versions import downcaster, upcaster

__all__ = [
    "BanyanError",
    "BrokerUnreachable",
    "BusCapacityExceeded",
    "Command",
    "CommandHandler",
    "ConcurrencyError",
    "ConfigurationError",
    "ContractError",
    "DependencyError",
    "Event",
    "EventHandler",
    "EventStoreError",
    "HandlerError",
    "IdempotencyKeyBusy",
    "IdempotencyStore",
    "IdempotencyStoreError",
    "Logger",
    "MemoryIdempotencyStore",
    "Message",
    "MessageBus",
    "MessageContext",
    "PayloadTooLarge",
    "PluginMissing",
    "PublishError",
    "Query",
    "QueryHandler",
    "RedisIdempotencyStore",
    "RemoteHandlerError",
    "RequestTimeout",
    "RetryPolicy",
    "SettleError",
    "TopologyError",
    "TopologyMismatch",
    "Unroutable",
    "current_context",
    "downcaster",
    "upcaster",
]
