"""The event store contract: streams with optimistic concurrency, and a transactional outbox.

Why an outbox: "save the events, then publish them" loses the publish when the
process dies between the two, and "publish, then save" announces what was never
stored. Here every appended event is written *together with* an outbox row in one
database transaction; :class:`banyan_bus.outbox.OutboxRelay` later publishes the
outbox rows with confirms and marks them sent. The store commits or it does not;
the bus sees an event if and only if the store kept it (at least once: see the
relay for the one seam where an event is published twice).

Backends implement two transactions: :meth:`EventStore.unit_of_work` (append /
publish / read inside one transaction) and :meth:`EventStore.claim_outbox` (lock
unsent rows, let the relay publish them, mark them sent on commit). Everything
else -- version checks, metadata, encoding -- lives here, once.

Versions: the first event of a stream is version 1; a stream's version is the
version of its last event, 0 while it has none. ``expected_version`` is that number,
or :data:`NO_STREAM` (the stream must not exist yet, same as 0) or :data:`ANY`.
"""

from __future__ import annotations

import enum
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from banyan_bus.context import current_context
from banyan_bus.contracts import ContractRegistry, Event, Message, registry
from banyan_bus.envelope import new_id
from banyan_bus.errors import ConcurrencyError, ContractError, EventStoreError

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
    "StoredEvent",
    "UnitOfWork",
]


class StreamState(enum.Enum):
    """Sentinels for ``expected_version`` that are not a version number."""

    NO_STREAM = "no-stream"
    ANY = "any"

    def __repr__(self) -> str:
        return self.name


#: The stream must not exist yet (no event appended to it); same as ``expected_version=0``.
NO_STREAM = StreamState.NO_STREAM
#: No concurrency check: append after whatever the stream holds now.
ANY = StreamState.ANY

ExpectedVersion = int | StreamState


@dataclass(frozen=True, slots=True)
class EventMetadata:
    """Who caused an event: kept with it and sent with it when the relay publishes it."""

    correlation_id: str | None = None
    causation_id: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as the store keeps it: its place in its stream, its identity, its payload.

    ``payload`` is the contract's wire form (camelCase keys); ``event`` decodes it into
    the contract registered for ``(message_type, message_version)``.
    """

    stream: str
    version: int
    message_id: str
    message_type: str
    message_version: int
    payload: dict[str, Any]
    metadata: EventMetadata
    recorded_at: datetime
    position: int = 0
    contracts: ContractRegistry = field(default=registry, repr=False, compare=False)

    @property
    def event(self) -> Message:
        """The payload decoded into its contract (``ContractError`` if none is registered)."""
        return decode(self.contracts, self.message_type, self.message_version, self.payload)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One outbox row waiting to be published.

    ``ordering_key`` groups rows that must be published in ``position`` order: the
    stream for appended events; for a publish-only row its partition key, else its own id
    (no order with anything else).
    """

    position: int
    message_id: str
    stream: str | None
    message_type: str
    message_version: int
    payload: dict[str, Any]
    metadata: EventMetadata
    partition_key: str | None
    ordering_key: str


def decode(
    contracts: ContractRegistry, message_type: str, version: int, payload: dict[str, Any]
) -> Message:
    cls = contracts.get(message_type, version)
    if cls is None:
        raise ContractError(
            f"no contract is registered for message type {message_type!r} version {version}: "
            f"import the module that defines it before reading or relaying it"
        )
    return cls.model_validate(payload)


@dataclass(frozen=True, slots=True)
class _Record:
    """An event or publish-only message encoded for insertion."""

    message_id: str
    message_type: str
    message_version: int
    payload: str  # JSON text, wire form


def _encode(event: Message, message_id: str | None = None) -> _Record:
    if not isinstance(event, Message):
        raise ContractError(f"expected a contract instance (an Event), got {type(event).__name__}")
    return _Record(
        message_id=message_id or new_id("evt_"),
        message_type=type(event).__message_type__,
        message_version=type(event).__message_version__,
        payload=json.dumps(event.model_dump(mode="json", by_alias=True), separators=(",", ":")),
    )


def _metadata(correlation_id: str | None, causation_id: str | None) -> EventMetadata:
    """Inside a handler, inherit correlation and cause from the message being handled."""
    ctx = current_context()
    if ctx is not None:
        correlation_id = correlation_id or ctx.correlation_id
        causation_id = causation_id or ctx.id
    return EventMetadata(correlation_id=correlation_id or new_id("cor_"), causation_id=causation_id)


def _check_version(stream: str, expected: ExpectedVersion, actual: int) -> None:
    if expected is ANY:
        return
    want = 0 if expected is NO_STREAM else expected
    if not isinstance(want, int) or isinstance(want, bool) or want < 0:
        raise ValueError(f"expected_version must be an int >= 0, NO_STREAM or ANY, got {want!r}")
    if want != actual:
        raise ConcurrencyError(stream, expected, actual)


class UnitOfWork(ABC):
    """One database transaction: append to streams, publish through the outbox, read.

    Everything done through it commits together when the ``async with`` block ends,
    or is rolled back -- events and outbox rows alike, so nothing is published -- when
    the block raises::

        async with store.unit_of_work() as uow:
            version = await uow.append("order-1", [OrderPlaced(...)], expected_version=NO_STREAM)
            await uow.publish(CustomerNotified(...))   # outbox only, no stream

    Methods run their SQL at once (not at commit), so a ``ConcurrencyError`` is raised by
    the ``append`` that clashed.
    """

    def __init__(self, contracts: ContractRegistry) -> None:
        self.contracts = contracts

    async def append(
        self,
        stream: str,
        events: Sequence[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> int:
        """Append ``events`` to ``stream`` and queue them in the outbox; return the new version.

        Raises :class:`ConcurrencyError` (nothing written) if the stream's version is not
        ``expected_version``. Inside a handler, metadata defaults to the handled message's
        correlation id, with that message as the cause.
        """
        if not stream:
            raise ValueError("stream must be a non-empty string")
        records = [_encode(e) for e in events]
        current = await self._lock_stream(stream)
        _check_version(stream, expected_version, current)
        if not records:
            return current
        meta = _metadata(correlation_id, causation_id)
        await self._insert_events(stream, current + 1, records, meta)
        await self._insert_outbox(stream, records, meta, partition_key=stream, ordering_key=stream)
        return current + len(records)

    async def publish(
        self,
        event: Event,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        partition_key: str | None = None,
    ) -> str:
        """Queue ``event`` for publishing through the outbox (no stream); return its id.

        It is published by the relay if and only if this unit of work commits. Rows with
        the same ``partition_key`` (default: the contract's partition key field) are
        published in order; without one, in no particular order.
        """
        record = _encode(event, message_id)
        key = partition_key
        field_name = type(event).__partition_key__
        if key is None and field_name is not None:
            key = str(getattr(event, field_name))
        meta = _metadata(correlation_id, causation_id)
        await self._insert_outbox(
            None, [record], meta, partition_key=key, ordering_key=key or record.message_id
        )
        return record.message_id

    @abstractmethod
    async def read_stream(self, stream: str, from_version: int = 0) -> list[StoredEvent]:
        """Events of ``stream`` with version >= ``from_version``, oldest first (seen by this
        transaction)."""

    @abstractmethod
    async def _lock_stream(self, stream: str) -> int:
        """Serialize appends to ``stream`` until this transaction ends; return its version."""

    @abstractmethod
    async def _insert_events(
        self, stream: str, first_version: int, records: list[_Record], meta: EventMetadata
    ) -> None: ...

    @abstractmethod
    async def _insert_outbox(
        self,
        stream: str | None,
        records: list[_Record],
        meta: EventMetadata,
        *,
        partition_key: str | None,
        ordering_key: str,
    ) -> None: ...


class OutboxBatch(ABC):
    """Unsent outbox rows claimed by one relay, inside an open transaction.

    While the batch is open no other relay can claim these rows, nor any later row of
    the same ordering key (stream). ``mark_sent`` records what was confirmed; leaving the
    ``async with`` block commits that, and an exception (or a dying process) rolls it back,
    so the rows are claimed again later.
    """

    rows: list[OutboxMessage]

    @abstractmethod
    async def mark_sent(self, positions: Sequence[int]) -> None: ...


class EventStore(ABC):
    """Streams of events with optimistic concurrency, and the outbox that publishes them.

    Use as an async context manager (or ``open()``/``close()``); the schema is created
    on open if missing::

        async with SqliteEventStore("events.db") as store:
            v = await store.append_to_stream("order-1", [OrderPlaced(...)],
                                             expected_version=NO_STREAM)
            events = await store.read_stream("order-1")
    """

    def __init__(self, contracts: ContractRegistry | None = None) -> None:
        self.contracts = contracts or registry

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables if they do not exist (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def unit_of_work(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """A transaction for appends and outbox publishes; see :class:`UnitOfWork`."""

    @abstractmethod
    def claim_outbox(self, limit: int) -> AbstractAsyncContextManager[OutboxBatch]:
        """Claim up to ``limit`` unsent rows, in per-ordering-key order (for the relay)."""

    @abstractmethod
    async def count_unsent(self) -> int:
        """How many outbox rows are not yet marked sent (monitoring, tests)."""

    @abstractmethod
    async def purge_sent(self, older_than: timedelta = timedelta(days=7)) -> int:
        """Delete outbox rows marked sent more than ``older_than`` ago; return how many.

        Sent rows are kept (not deleted at once) so an operator can see what was relayed
        and when; run this now and then (a cron job, or a task beside the relay) to keep
        the outbox table small. Events themselves are never deleted.
        """

    async def append_to_stream(
        self,
        stream: str,
        events: Sequence[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> int:
        """Append ``events`` and their outbox rows in one transaction; return the new version.

        Raises :class:`ConcurrencyError` if the stream is not at ``expected_version``.
        """
        async with self.unit_of_work() as uow:
            return await uow.append(
                stream,
                events,
                expected_version=expected_version,
                correlation_id=correlation_id,
                causation_id=causation_id,
            )

    async def read_stream(self, stream: str, from_version: int = 0) -> list[StoredEvent]:
        """Events of ``stream`` with version >= ``from_version``, oldest first ([] if none)."""
        async with self.unit_of_work() as uow:
            return await uow.read_stream(stream, from_version)
