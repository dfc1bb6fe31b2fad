"""Operate a group's dead-letter queue: look at what failed, replay it, or drop it.

A dead-letter queue (``dlq.exchange.platform.events.{group}.{event}``) holds
two kinds of records, and :class:`DeadLetter` reads both the same way:

- our own, written by the consumer engine: the original body, properties and
  headers plus ``x-banyan-reason``, the exception, a trimmed traceback,
  ``x-attempt``, the handler, the group and the failure times;
- the broker's, when the group queue dead-lettered a message itself through
  its ``x-dead-letter-*`` arguments (a consumer rejected it, it exceeded the
  quorum delivery limit, it expired): RabbitMQ's ``x-death`` headers and
  nothing else.

The record's format - writing it, reading it, copying a message without its
record - is ``deadletter.py``'s; this module is the operator's tooling on top.

Example::

    dlq = bus.dlq("email-service", UserCreated)   # or DeadLetterQueue(transport, group, contract)
    for dead in await dlq.list():
        print(dead.message_id, dead.reason, dead.exception_message)
    result = await dlq.replay(where=lambda d: d.reason == "handler-failed")
    assert not result.failed, result.failed

**Peeking.** AMQP has no "browse": :meth:`DeadLetterQueue.list` takes messages
with ``basic.get`` and, once it has read them all, gives every one back
(``nack`` with requeue). Holding all of them until the end is what makes the
read terminate: a requeued message is ready again at once (a quorum queue puts
it behind the others), so give-back-as-you-go would read it again and again.
A peek changes nothing but the broker's redelivery flag and delivery count.

**Streaming.** ``find``, ``replay`` and ``purge`` (by id or predicate) read
the DLQ one message at a time and hold at most ``window`` (default 500)
unacked: what they act on is settled at once, and when the window is full the
held records are moved to the DLQ's tail (confirmed copy, then ack) rather
than requeued, since a classic queue would hand a requeued message straight
back. Memory stays bounded whatever the DLQ's size; a long walk may reorder it
(details in ``DeadLetterQueue._walk``). ``list(limit)`` holds ``limit``.

**Moving.** A replay is a move, so it follows the engine's rule for moves: the
copy is published to the group's *own* exchange with publisher confirms and
``mandatory``, and only after the broker confirmed it is the DLQ copy acked.
When the publish fails the DLQ copy is given back and the error is reported:
nothing is lost, at worst a message is replayed twice (if the ack is lost),
which the original message id lets idempotent handlers absorb.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from banyan_bus import topology
from banyan_bus.contracts import Message, routing_key_for
from banyan_bus.deadletter import BROKER_REASONS, republish
from banyan_bus.declarations import apply
from banyan_bus.delay import delay_route
from banyan_bus.dlq_record import DeadLetter
from banyan_bus.errors import BanyanError, TopologyError
from banyan_bus.topology import delay_plan, retry_route_plan
from banyan_bus.transport.base import DEFAULT_EXCHANGE, Delivery, Transport

__all__ = [
    "BROKER_REASONS",
    "DeadLetter",
    "DeadLetterQueue",
    "ReplayResult",
]

log = structlog.get_logger("banyan_bus.dlq")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay did. ``replayed`` and ``failed`` are keyed by :attr:`DeadLetter.ref`.

    ``failed`` maps each message whose publish was not confirmed to the error;
    those messages are still in the DLQ, unchanged. ``missing`` lists ids that
    were asked for and not found in the DLQ.
    """

    replayed: builtins.list[str] = field(default_factory=builtins.list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: builtins.list[str] = field(default_factory=builtins.list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.missing


_Held = builtins.list[tuple[Delivery, DeadLetter]]

#: How many DLQ messages find/replay/purge hold unacked at once (see ``_walk``).
DEFAULT_WINDOW = 500

#: How long a give-back waits for the broker to show the messages as ready again.
_GIVE_BACK_WAIT_S = 5.0


class DeadLetterQueue:
    """The DLQ of one group's subscription to a contract class or a message type name.

    Every operation works on the messages that were in the queue when it
    started; one that arrives meanwhile is left for the next call.
    """

    def __init__(
        self,
        transport: Transport,
        group: str,
        contract_or_message_type: type[Message] | str,
        *,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.transport = transport
        #: At most this many messages are held unacked (and in memory) by
        #: ``find``/``replay``/``purge``; ``list(limit)`` holds ``limit``.
        self.window = window
        #: The most held unacked at once by the last ``find``/``replay``/``purge``.
        self.peak_unacked = 0
        self.group = topology.check_group_name(group)
        if isinstance(contract_or_message_type, str):
            self.message_type = contract_or_message_type
        else:
            self.message_type = contract_or_message_type.__message_type__
        #: ``dlq.exchange.platform.events.{group}.{event}``
        self.name = topology.dead_letter_queue(self.group, self.message_type)
        #: Where replays go: the group's own exchange, so no other group sees a duplicate.
        self.target_exchange = topology.group_exchange(self.group, self.message_type)

    def __repr__(self) -> str:
        return f"<DeadLetterQueue {self.name!r}>"

    async def count(self) -> int:
        """Messages ready in the DLQ (not those another operator is holding right now)."""
        state = await self.transport.queue_state(self.name)
        if state is None:
            raise TopologyError(
                f"dead-letter queue {self.name!r} does not exist: group {self.group!r} has "
                f"never subscribed to {self.message_type} on this broker (check the group "
                f"and the message type)."
            )
        return state.messages

    async def list(self, limit: int = 100) -> builtins.list[DeadLetter]:
        """The first ``limit`` messages, oldest first, left in the queue."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        held, ready = await self._take(limit)
        await self._give_back(held, ready)
        return [dead for _, dead in held]

    async def find(self, ref: str) -> DeadLetter | None:
        """The message whose :attr:`DeadLetter.ref` is ``ref``, left in the queue.

        Streams the DLQ (see :meth:`_walk`) and stops at the first match.
        """
        found: builtins.list[DeadLetter] = []

        async def visit(delivery: Delivery, dead: DeadLetter) -> bool:
            if dead.ref == ref:
                found.append(dead)
            return False

        await self._walk(visit, lambda: bool(found))
        return found[0] if found else None

    async def replay(
        self,
        ids: Iterable[str] | None = None,
        where: Callable[[DeadLetter], bool] | None = None,
        *,
        keep_progress: bool = False,
    ) -> ReplayResult:
        """Send messages back to the group: those in ``ids``, those ``where`` accepts, or all.

        Each is published to the group's exchange with its original id, body
        and properties, attempts reset (see :meth:`DeadLetter.replay_message`),
        confirmed, and only then removed from the DLQ. One that cannot be
        published stays in the DLQ and is reported in ``failed``.

        Every handler of the group runs again: the record's ``x-banyan-handled``
        is dropped. ``keep_progress=True`` keeps it, so handlers that had
        succeeded are skipped; such a message goes through the group's retry
        route (the delay levels, 1 s) because that is the only route on which
        the consumer believes the header (``deadletter.handled_before``).
        """
        wanted = None if ids is None else set(ids)
        target = self.target_exchange
        routing_key = routing_key_for(self.message_type)
        progress_route = delay_route(1000, target) if keep_progress else None
        # Publishing to a missing exchange makes RabbitMQ close the publishing
        # channel, which every publisher of this connection shares: check first.
        blocked = None
        if not await self.transport.exchange_exists(target):
            blocked = (
                f"exchange {target!r} does not exist (was the subscription removed?); "
                f"the message stays in {self.name!r}"
            )
        elif keep_progress:
            await apply(self.transport, [*delay_plan(), *retry_route_plan(target)])
        replayed: builtins.list[str] = []
        failed: dict[str, str] = {}
        seen: set[str] = set()

        async def visit(delivery: Delivery, dead: DeadLetter) -> bool:
            if wanted is not None and dead.ref in wanted:
                seen.add(dead.ref)
            if not _chosen(dead, wanted, where):
                return False
            if blocked is not None:
                failed[dead.ref] = blocked
                return False
            try:
                message = dead.replay_message(keep_progress=keep_progress)
                if progress_route is not None and dead.handled:
                    await self.transport.publish(
                        progress_route.exchange,
                        progress_route.routing_key,
                        message,
                        confirm=True,
                        mandatory=True,
                    )
                else:
                    await self.transport.publish(
                        target, routing_key, message, confirm=True, mandatory=True
                    )
            except (BanyanError, TypeError, ValueError, OverflowError) as exc:
                # TypeError/ValueError/OverflowError: headers the AMQP client cannot
                # encode (a non-UTF-8 string, a double beyond float32), which the
                # transport does not translate yet. One such message must not stop
                # the replay of the others.
                failed[dead.ref] = f"{type(exc).__name__}: {exc}"
                return False
            await self._settle(delivery, ack=True)
            replayed.append(dead.ref)
            return True

        await self._walk(visit, lambda: wanted is not None and len(seen) == len(wanted))
        missing = sorted(wanted - seen) if wanted else []
        log.info(
            "dlq_replayed",
            queue=self.name,
            replayed=len(replayed),
            failed=len(failed),
            missing=len(missing),
        )
        return ReplayResult(replayed=replayed, failed=failed, missing=missing)

    async def purge(
        self,
        ids: Iterable[str] | None = None,
        where: Callable[[DeadLetter], bool] | None = None,
    ) -> int:
        """Delete messages for good: those in ``ids``, those ``where`` accepts, or all.

        Returns how many were deleted.
        """
        if ids is None and where is None:
            dropped = await self.transport.purge_queue(self.name)
            log.warning("dlq_purged", queue=self.name, dropped=dropped)
            return dropped
        wanted = None if ids is None else set(ids)
        dropped = 0
        seen: set[str] = set()

        async def visit(delivery: Delivery, dead: DeadLetter) -> bool:
            nonlocal dropped
            if wanted is not None and dead.ref in wanted:
                seen.add(dead.ref)
            if not _chosen(dead, wanted, where):
                return False
            await self._settle(delivery, ack=True)
            dropped += 1
            return True

        await self._walk(visit, lambda: wanted is not None and len(seen) == len(wanted))
        log.warning("dlq_purged", queue=self.name, dropped=dropped)
        return dropped

    # -- streaming ------------------------------------------------------------------------

    async def _walk(
        self,
        visit: Callable[[Delivery, DeadLetter], Awaitable[bool]],
        done: Callable[[], bool],
    ) -> None:
        """Take the DLQ's messages one by one (``basic.get``), holding at most
        :attr:`window` unacked, until each one there at the start was seen once
        or ``done()``.

        ``visit`` acts on a message at once and returns True if it settled it
        (replayed, purged); the others are held. When :attr:`window` are held,
        they are *rotated*: each is copied to the DLQ's tail (confirmed) and only
        then acked, so memory and the broker's unacked count stay bounded on
        every queue type. (Requeueing instead would not do: a classic queue puts
        a requeued message back at its head, where the next ``basic.get`` would
        read it again.) At the end, what is still held is given back (requeue).
        So a walk over a DLQ larger than the window reorders it (rotated records
        behind the rest), and a crash between a copy's confirm and the original's
        ack leaves one record twice (same id); nothing is ever lost. A walk that
        ends early (``done()``: the id was found) touches only what it read.
        """
        ready = await self.count()
        held: _Held = []
        removed = 0
        self.peak_unacked = 0
        try:
            for _ in range(ready):
                if done():
                    break
                delivery = await self.transport.get(self.name)
                if delivery is None:  # someone else holds or took the rest
                    break
                dead = DeadLetter.from_delivery(delivery, group=self.group)
                self.peak_unacked = max(self.peak_unacked, len(held) + 1)
                if await visit(delivery, dead):
                    removed += 1
                    continue
                held.append((delivery, dead))
                if len(held) >= self.window:
                    await self._rotate(held)
                    held.clear()
        finally:
            await self._give_back(held, ready - removed)

    async def _rotate(self, held: _Held) -> None:
        """Move the held records to the DLQ's tail: confirmed copy, then ack."""
        for delivery, _ in held:
            if delivery.settled:
                continue
            await self.transport.publish(
                DEFAULT_EXCHANGE,
                self.name,
                republish(delivery, delivery.headers),
                confirm=True,
                mandatory=True,
            )
            await self._settle(delivery, ack=True)

    # -- holding messages ---------------------------------------------------------------

    async def _take(self, limit: int | None) -> tuple[_Held, int]:
        """``basic.get`` up to ``limit`` (or all ready) messages and hold them unacked.

        Bounded by the ready count at the start (returned with the messages),
        so a requeued or newly arrived message is never read twice in one
        operation.
        """
        ready = await self.count()
        budget = ready if limit is None else min(ready, limit)
        held: _Held = []
        try:
            for _ in range(budget):
                delivery = await self.transport.get(self.name)
                if delivery is None:  # someone else holds or took the rest
                    break
                held.append((delivery, DeadLetter.from_delivery(delivery, group=self.group)))
        except BaseException:
            await self._give_back(held, None)
            raise
        return held, ready

    async def _give_back(self, held: _Held, expected: int | None) -> None:
        """Requeue what is still held, then wait until the queue shows it again.

        ``basic.nack`` has no reply, and a quorum queue applies the return
        through its log: without the wait, a ``list()`` followed at once by a
        ``replay()`` would see a DLQ that looks emptier than it is and replay
        only part of it. ``expected`` is how many messages must be ready again
        (those there at the start minus those this operation removed); the wait
        is bounded, since others may be holding or removing messages too.
        """
        returned = 0
        for delivery, _ in held:
            if not delivery.settled:
                await self._settle(delivery, ack=False)
                returned += 1
        if not returned or expected is None:
            return
        deadline = asyncio.get_running_loop().time() + _GIVE_BACK_WAIT_S
        while (state := await self.transport.queue_state(self.name)) is not None:
            if state.messages >= expected or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.005)

    async def _settle(self, delivery: Delivery, *, ack: bool) -> None:
        """Ack or requeue, tolerating a lost channel: the broker then requeues it anyway."""
        try:
            if ack:
                await delivery.ack()
            else:
                await delivery.nack(requeue=True)
        except BanyanError as exc:
            log.warning(
                "dlq_settle_failed",
                queue=self.name,
                message_id=delivery.message_id,
                action="ack" if ack else "requeue",
                error=str(exc),
                detail="the broker returns the message to the DLQ; a replayed message may "
                "then be replayed again later (same id: idempotent handlers absorb it)",
            )


def _chosen(
    dead: DeadLetter, wanted: set[str] | None, where: Callable[[DeadLetter], bool] | None
) -> bool:
    if wanted is not None and dead.ref not in wanted:
        return False
    return where is None or where(dead)


# The old name of ``DeadLetterQueue(...)``, importable until the CLI's last caller moves
# (not exported): ``topology.dead_letter_queue`` is the queue's *name*.
dead_letter_queue = DeadLetterQueue
