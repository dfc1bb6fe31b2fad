"""Event store with a transactional outbox: store events and publish them, atomically.

Backends: :class:`SqliteEventStore` (aiosqlite, a file; ``pip install "banyan-bus[sqlite]"``)
and :class:`PostgresEventStore` (asyncpg; ``pip install "banyan-bus[postgres]"``). The
driver is imported when a store is created, with an install hint if it is missing.
:class:`banyan_bus.outbox.OutboxRelay` publishes what the outbox holds.
"""

from banyan_bus.eventstore.base import (
    ANY,
    NO_STREAM,
    ConcurrencyError,
    EventMetadata,
    EventStore,
    EventStoreError,
    ExpectedVersion,
    OutboxBatch,
    OutboxMessage,
    StoredEvent,
    UnitOfWork,
)
from banyan_bus.eventstore.postgres import PostgresEventStore
from banyan_bus.eventstore.sqlite import SqliteEventStore

__all__ = [
    "ANY",
    "NO_STREAM",
    "ConcurrencyError",
    "EventMetadata",
    "EventStore",
    "EventStoreError",
    "ExpectedVersion",
    "OutboxBatch",
    "OutboxMessage",
    "PostgresEventStore",
    "SqliteEventStore",
    "StoredEvent",
    "UnitOfWork",
]
