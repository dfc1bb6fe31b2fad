"""PostgreSQL event store (asyncpg): several service instances and relays at once.

Appends to one stream are serialized with a transaction-scoped advisory lock on the
stream name, taken before the version check. So the check cannot race, and -- what the
outbox relies on -- a stream's outbox rows get their positions in commit order.

The relay's claim (:meth:`PostgresEventStore.claim_outbox`) locks the *oldest unsent row
of each stream* with ``FOR UPDATE SKIP LOCKED`` and then takes the unsent rows of those
streams. A head row locked by one relay makes the whole stream invisible to the others
(their heads query still sees the locked row as the head, and skips it), so two relays
never publish the same row at once, and a stream is published by one relay at a time,
in order. The lock is held while the batch is published and until ``sent_at`` is
committed; if the relay dies in between, PostgreSQL rolls the claim back and the rows
are published again by the next claim -- the at-least-once seam, which the kept
message ids let idempotent consumers absorb.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from banyan_bus.contracts import ContractRegistry
from banyan_bus.eventstore.base import (
    EventMetadata,
    EventStore,
    EventStoreError,
    OutboxBatch,
    OutboxMessage,
    StoredEvent,
    UnitOfWork,
    _Record,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresEventStore"]


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'PostgresEventStore needs asyncpg: pip install "banyan-bus[postgres]"'
        ) from exc
    return asyncpg


def _schema_sql(s: str) -> str:
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.banyan_events (
    position BIGSERIAL PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    message_type TEXT NOT NULL,
    message_version INTEGER NOT NULL,
    payload JSONB NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS {s}.banyan_outbox (
    position BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    stream TEXT,
    message_type TEXT NOT NULL,
    message_version INTEGER NOT NULL,
    payload JSONB NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    partition_key TEXT,
    ordering_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS banyan_outbox_unsent
    ON {s}.banyan_outbox (ordering_key, position) WHERE sent_at IS NULL;
"""


_OUTBOX_COLUMNS = (
    "position, message_id, stream, message_type, message_version, payload, "
    "correlation_id, causation_id, partition_key, ordering_key"
)


class _PostgresUnitOfWork(UnitOfWork):
    def __init__(self, conn: asyncpg.Connection, schema: str, contracts: ContractRegistry) -> None:
        super().__init__(contracts)
        self._conn = conn
        self._s = schema

    async def read_stream(self, stream: str, from_version: int = 0) -> list[StoredEvent]:
        rows = await self._conn.fetch(
            "SELECT position, stream, version, message_id, message_type, message_version, "
            "payload::text, correlation_id, causation_id, recorded_at "
            f"FROM {self._s}.banyan_events "
            "WHERE stream = $1 AND version >= $2 ORDER BY version",
            stream,
            from_version,
        )
        return [
            StoredEvent(
                position=r[0],
                stream=r[1],
                version=r[2],
                message_id=r[3],
                message_type=r[4],
                message_version=r[5],
                payload=json.loads(r[6]),
                metadata=EventMetadata(correlation_id=r[7], causation_id=r[8]),
                recorded_at=r[9],
                contracts=self.contracts,
            )
            for r in rows
        ]

    async def _lock_stream(self, stream: str) -> int:
        await self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", stream)
        version = await self._conn.fetchval(
            f"SELECT COALESCE(MAX(version), 0) FROM {self._s}.banyan_events WHERE stream = $1",
            stream,
        )
        return int(version)

    async def _insert_events(
        self, stream: str, first_version: int, records: list[_Record], meta: EventMetadata
    ) -> None:
        await self._conn.executemany(
            f"INSERT INTO {self._s}.banyan_events (stream, version, message_id, message_type, "
            "message_version, payload, correlation_id, causation_id) "
            "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)",
            [
                (
                    stream,
                    first_version + i,
                    r.message_id,
                    r.message_type,
                    r.message_version,
                    r.payload,
                    meta.correlation_id,
                    meta.causation_id,
                )
                for i, r in enumerate(records)
            ],
        )

    async def _insert_outbox(
        self,
        stream: str | None,
        records: list[_Record],
        meta: EventMetadata,
        *,
        partition_key: str | None,
        ordering_key: str,
    ) -> None:
        await self._conn.executemany(
            f"INSERT INTO {self._s}.banyan_outbox (message_id, stream, message_type, "
            "message_version, payload, correlation_id, causation_id, partition_key, "
            "ordering_key) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)",
            [
                (
                    r.message_id,
                    stream,
                    r.message_type,
                    r.message_version,
                    r.payload,
                    meta.correlation_id,
                    meta.causation_id,
                    partition_key,
                    ordering_key,
                )
                for r in records
            ],
        )


class _PostgresOutboxBatch(OutboxBatch):
    def __init__(self, conn: asyncpg.Connection, schema: str, rows: list[OutboxMessage]) -> None:
        self._conn = conn
        self._s = schema
        self.rows = rows

    async def mark_sent(self, positions: Sequence[int]) -> None:
        await self._conn.execute(
            f"UPDATE {self._s}.banyan_outbox SET sent_at = now() "
            "WHERE position = ANY($1::bigint[])",
            list(positions),
        )


class PostgresEventStore(EventStore):
    """Event store and outbox in PostgreSQL (``dsn``, e.g. ``postgresql://user@host/db``).

    ``schema`` holds the two tables (``banyan_events``, ``banyan_outbox``); it is created
    if missing. ``min_size``/``max_size`` bound the connection pool.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        contracts: ContractRegistry | None = None,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        super().__init__(contracts)
        self._asyncpg = _import_asyncpg()
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema must be letters, digits and underscores, got {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._s = f'"{schema}"'
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"<PostgresEventStore dsn={self.dsn.split('@')[-1]!r} schema={self.schema!r}>"

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await self._asyncpg.create_pool(
                self.dsn, min_size=self.min_size, max_size=self.max_size
            )
        except (OSError, self._asyncpg.PostgresError) as exc:
            raise EventStoreError(f"cannot connect to PostgreSQL for {self!r}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                # Two instances starting at once may race on CREATE ... IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_lock(hashtextextended('banyan_schema', 0))")
                try:
                    await conn.execute(_schema_sql(self._s))
                finally:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtextextended('banyan_schema', 0))"
                    )
        except self._asyncpg.PostgresError as exc:
            await pool.close()
            raise EventStoreError(f"cannot create the event store tables: {exc}") from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise EventStoreError(f"{self!r} is not open: use `async with store:` or open()")
        # Only the driver's own errors are translated; an OSError raised by the caller's
        # code inside the block is theirs and passes through unchanged.
        errors = (self._asyncpg.PostgresError, self._asyncpg.InterfaceError)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn
        except errors as exc:
            raise EventStoreError(f"PostgreSQL transaction failed: {exc}") from exc
        except OSError as exc:
            if _raised_by_driver(exc):
                raise EventStoreError(f"PostgreSQL connection failed: {exc}") from exc
            raise

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        async with self._transaction() as conn:
            yield _PostgresUnitOfWork(conn, self._s, self.contracts)

    @asynccontextmanager
    async def claim_outbox(self, limit: int) -> AsyncIterator[OutboxBatch]:
        s = self._s
        async with self._transaction() as conn:
            heads = await conn.fetch(
                f"SELECT ordering_key FROM {s}.banyan_outbox WHERE sent_at IS NULL AND position IN "
                f"(SELECT MIN(position) FROM {s}.banyan_outbox WHERE sent_at IS NULL "
                "GROUP BY ordering_key) ORDER BY position LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
            )
            rows: list[OutboxMessage] = []
            if heads:
                found = await conn.fetch(
                    f"SELECT {_OUTBOX_COLUMNS.replace('payload', 'payload::text')} "
                    f"FROM {s}.banyan_outbox WHERE sent_at IS NULL "
                    "AND ordering_key = ANY($1::text[]) ORDER BY position LIMIT $2",
                    [h[0] for h in heads],
                    limit,
                )
                rows = [_outbox_message(r) for r in found]
            yield _PostgresOutboxBatch(conn, s, rows)

    async def count_unsent(self) -> int:
        async with self._transaction() as conn:
            n = await conn.fetchval(
                f"SELECT COUNT(*) FROM {self._s}.banyan_outbox WHERE sent_at IS NULL"
            )
            return int(n)

    async def purge_sent(self, older_than: timedelta = timedelta(days=7)) -> int:
        async with self._transaction() as conn:
            status: str = await conn.execute(
                f"DELETE FROM {self._s}.banyan_outbox "
                "WHERE sent_at IS NOT NULL AND sent_at <= now() - $1::interval",
                older_than,
            )
            return int(status.rsplit(" ", 1)[-1])  # "DELETE <n>"


def _raised_by_driver(exc: BaseException) -> bool:
    """Whether ``exc`` came through asyncpg (a lost or refused connection)."""
    tb = exc.__traceback__
    while tb is not None:
        if "asyncpg" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _outbox_message(r: Any) -> OutboxMessage:
    return OutboxMessage(
        position=r[0],
        message_id=r[1],
        stream=r[2],
        message_type=r[3],
        message_version=r[4],
        payload=json.loads(r[5]),
        metadata=EventMetadata(correlation_id=r[6], causation_id=r[7]),
        partition_key=r[8],
        ordering_key=r[9],
    )
