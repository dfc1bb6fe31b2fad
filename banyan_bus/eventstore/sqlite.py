"""SQLite event store (aiosqlite): the embedded default, one file, no server.

One connection per store, guarded by an ``asyncio.Lock``: SQLite has one writer at a
time anyway, and a connection cannot hold two transactions. Every transaction starts
with ``BEGIN IMMEDIATE`` (the database write lock), which is what serializes appends to
a stream -- and, across processes sharing the file, everything else.

The outbox claim is deliberately simple: a relay batch holds the store's lock and the
write lock while it publishes, so two relays (in one process or several) take turns,
and appends wait for the batch (``busy_timeout`` across processes). That keeps
per-stream order trivially, at the cost of writers waiting one batch -- fine for the
embedded, single-service case this backend is for; use PostgreSQL for several
relay instances that must work at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
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
    import aiosqlite

__all__ = ["SqliteEventStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS banyan_events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    message_type TEXT NOT NULL,
    message_version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    recorded_at TEXT NOT NULL,
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS banyan_outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    stream TEXT,
    message_type TEXT NOT NULL,
    message_version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    correlation_id TEXT,
    causation_id TEXT,
    partition_key TEXT,
    ordering_key TEXT NOT NULL,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX IF NOT EXISTS banyan_outbox_unsent ON banyan_outbox (position) WHERE sent_at IS NULL;
"""

_OUTBOX_COLUMNS = (
    "position, message_id, stream, message_type, message_version, payload, "
    "correlation_id, causation_id, partition_key, ordering_key"
)


def _import_aiosqlite() -> Any:
    try:
        import aiosqlite
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'SqliteEventStore needs aiosqlite: pip install "banyan-bus[sqlite]"'
        ) from exc
    return aiosqlite


def _now() -> str:
    return datetime.now(UTC).isoformat()


class _SqliteUnitOfWork(UnitOfWork):
    def __init__(self, conn: aiosqlite.Connection, contracts: ContractRegistry) -> None:
        super().__init__(contracts)
        self._conn = conn

    async def read_stream(self, stream: str, from_version: int = 0) -> list[StoredEvent]:
        cursor = await self._conn.execute(
            "SELECT position, stream, version, message_id, message_type, message_version, "
            "payload, correlation_id, causation_id, recorded_at FROM banyan_events "
            "WHERE stream = ? AND version >= ? ORDER BY version",
            (stream, from_version),
        )
        rows = await cursor.fetchall()
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
                recorded_at=datetime.fromisoformat(r[9]),
                contracts=self.contracts,
            )
            for r in rows
        ]

    async def _lock_stream(self, stream: str) -> int:
        # BEGIN IMMEDIATE already holds the database write lock: reading is enough.
        cursor = await self._conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM banyan_events WHERE stream = ?", (stream,)
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _insert_events(
        self, stream: str, first_version: int, records: list[_Record], meta: EventMetadata
    ) -> None:
        now = _now()
        await self._conn.executemany(
            "INSERT INTO banyan_events (stream, version, message_id, message_type, "
            "message_version, payload, correlation_id, causation_id, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    now,
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
        now = _now()
        await self._conn.executemany(
            "INSERT INTO banyan_outbox (message_id, stream, message_type, message_version, "
            "payload, correlation_id, causation_id, partition_key, ordering_key, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    now,
                )
                for r in records
            ],
        )


class _SqliteOutboxBatch(OutboxBatch):
    def __init__(self, conn: aiosqlite.Connection, rows: list[OutboxMessage]) -> None:
        self._conn = conn
        self.rows = rows

    async def mark_sent(self, positions: Sequence[int]) -> None:
        now = _now()
        await self._conn.executemany(
            "UPDATE banyan_outbox SET sent_at = ? WHERE position = ?",
            [(now, p) for p in positions],
        )


class SqliteEventStore(EventStore):
    """Event store and outbox in one SQLite file (``path``; ``":memory:"`` for a scratch one).

    ``busy_timeout`` (seconds) is how long a transaction waits for another process
    holding the file's write lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        contracts: ContractRegistry | None = None,
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(contracts)
        self._aiosqlite = _import_aiosqlite()
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<SqliteEventStore path={self.path!r}>"

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            conn = await self._aiosqlite.connect(self.path, isolation_level=None)
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.executescript(_SCHEMA)
        except self._aiosqlite.Error as exc:
            raise EventStoreError(f"cannot open SQLite event store {self.path!r}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._conn is None:
            raise EventStoreError(f"{self!r} is not open: use `async with store:` or open()")
        conn = self._conn
        error = self._aiosqlite.Error
        async with self._lock:
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except error as exc:  # "database is locked" after busy_timeout, disk errors
                raise EventStoreError(
                    f"cannot start a transaction on {self.path!r}: {exc}"
                ) from exc
            try:
                yield conn
            except error as exc:
                await asyncio.shield(self._rollback(conn))
                raise EventStoreError(f"SQLite refused the statement: {exc}") from exc
            except BaseException:
                await asyncio.shield(self._rollback(conn))
                raise
            try:
                await conn.execute("COMMIT")
            except error as exc:
                await asyncio.shield(self._rollback(conn))
                raise EventStoreError(f"cannot commit to {self.path!r}: {exc}") from exc

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        # Never leave the connection inside a transaction: the next BEGIN would fail.
        try:
            await conn.execute("ROLLBACK")
        except self._aiosqlite.Error:
            pass  # no transaction was open (SQLite already rolled it back)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        async with self._transaction() as conn:
            yield _SqliteUnitOfWork(conn, self.contracts)

    @asynccontextmanager
    async def claim_outbox(self, limit: int) -> AsyncIterator[OutboxBatch]:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM banyan_outbox WHERE sent_at IS NULL "
                "ORDER BY position LIMIT ?",
                (limit,),
            )
            rows = [_outbox_message(r) for r in await cursor.fetchall()]
            yield _SqliteOutboxBatch(conn, rows)

    async def count_unsent(self) -> int:
        async with self._transaction() as conn:
            cursor = await conn.execute("SELECT COUNT(*) FROM banyan_outbox WHERE sent_at IS NULL")
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

    async def purge_sent(self, older_than: timedelta = timedelta(days=7)) -> int:
        cutoff = (datetime.now(UTC) - older_than).isoformat()
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM banyan_outbox WHERE sent_at IS NOT NULL AND sent_at <= ?", (cutoff,)
            )
            return cursor.rowcount


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
