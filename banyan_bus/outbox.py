"""``OutboxRelay``: publish what the event store's outbox holds, with confirms, in order.

The store writes events and outbox rows in one transaction (see
:mod:`banyan_bus.eventstore`); this relay closes the loop. Each round it claims a
batch of unsent rows (:meth:`EventStore.claim_outbox`), publishes them -- keeping each
event's message id and correlation id, with the stream as partition key -- waits for
the broker's confirms, marks the confirmed rows sent, and commits.

Guarantees:

* **Nothing lost.** A row is marked sent only after its publish was confirmed. A crash
  anywhere leaves it unsent, and the next relay (a restart, or another instance)
  publishes it.
* **At least once, not exactly once.** If a relay dies after the broker confirmed a
  publish but before ``sent_at`` was committed, the row is published again. The
  message id is the same, so a consumer subscribed with ``idempotent=True`` runs its
  side effect once. This is the one seam; it cannot be closed without a distributed
  transaction.
* **Per-stream order.** Rows of one stream are published one after the other, each
  after the previous one's confirm, and a stream is claimed by one relay at a time
  (PostgreSQL: the stream's oldest unsent row is locked ``FOR UPDATE SKIP LOCKED``;
  SQLite: relays take turns). A publish that fails stops its stream for this round,
  so a later event never overtakes an earlier one. Different streams are published
  concurrently.
* **Several relays.** Safe on PostgreSQL (they share the work, stream by stream); on
  SQLite they take turns.

Example::

    relay = OutboxRelay(store, bus)
    task = asyncio.create_task(relay.run())
    ...
    relay.stop()
    await task
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from banyan_bus.bus import MessageBus
from banyan_bus.eventstore.base import EventStore, OutboxBatch, OutboxMessage, decode

__all__ = ["OutboxRelay"]

log = structlog.get_logger("banyan_bus.outbox")


class OutboxRelay:
    """Publishes a store's outbox rows to ``bus``; run one or more per service.

    ``batch_size`` rows are claimed per round; when a round finds nothing, the relay
    sleeps ``poll_interval`` seconds. After a failure (broker or database down) it logs
    and retries with a backoff of up to ``max_backoff`` seconds, never giving up.
    """

    def __init__(
        self,
        store: EventStore,
        bus: MessageBus,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self._stopping = asyncio.Event()
        self.published = 0

    def __repr__(self) -> str:
        return f"<OutboxRelay store={self.store!r} bus={self.bus!r}>"

    async def run(self) -> None:
        """Relay until :meth:`stop`; returns after the batch in flight is committed.

        A relay runs once: after ``stop()`` (even one called before ``run`` started),
        ``run`` returns at once; make a new relay to start again.
        """
        failures = 0
        while not self._stopping.is_set():
            try:
                count = await self.relay_once()
            except Exception as exc:
                failures += 1
                delay = min(self.max_backoff, self.poll_interval * 2**failures)
                log.warning("outbox_relay_failed", error=repr(exc), retry_in=delay)
                await self._sleep(delay)
                continue
            failures = 0
            if count == 0:
                await self._sleep(self.poll_interval)

    def stop(self) -> None:
        """Ask :meth:`run` to return (after the current batch); safe to call twice."""
        self._stopping.set()

    async def relay_once(self) -> int:
        """Claim one batch, publish it, mark what was confirmed; return how many were sent.

        Raises the first publish error after committing what did get confirmed (the
        failed stream's later rows stay unsent, in order, for the next round).
        """
        async with self.store.claim_outbox(self.batch_size) as batch:
            if not batch.rows:
                return 0
            by_key: dict[str, list[OutboxMessage]] = {}
            for row in batch.rows:
                by_key.setdefault(row.ordering_key, []).append(row)
            results = await asyncio.gather(
                *(self._publish_in_order(rows) for rows in by_key.values())
            )
            sent = [p for positions, _ in results for p in positions]
            errors = [e for _, e in results if e is not None]
            if sent:
                await self._mark_sent(batch, sent)
        self.published += len(sent)
        if errors:
            raise errors[0]
        return len(sent)

    async def _publish_in_order(
        self, rows: Sequence[OutboxMessage]
    ) -> tuple[list[int], Exception | None]:
        """Publish one stream's rows, each after the previous confirm; stop at a failure."""
        sent: list[int] = []
        for row in rows:
            try:
                event = decode(
                    self.store.contracts, row.message_type, row.message_version, row.payload
                )
                await self.bus.publish(
                    event,
                    message_id=row.message_id,
                    correlation_id=row.metadata.correlation_id,
                    causation_id=row.metadata.causation_id,
                    partition_key=row.partition_key,
                    wait_for_confirmation=True,
                )
            except Exception as exc:
                log.warning(
                    "outbox_publish_failed",
                    message_id=row.message_id,
                    ordering_key=row.ordering_key,
                    error=repr(exc),
                )
                return sent, exc
            sent.append(row.position)
        return sent, None

    async def _mark_sent(self, batch: OutboxBatch, positions: Sequence[int]) -> None:
        # The at-least-once seam: a relay that dies here has published these rows but
        # will not commit sent_at, so they are published again (same ids) later.
        await batch.mark_sent(positions)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
