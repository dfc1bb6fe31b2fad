"""The vocabulary of broker topology: what to declare, as plain data.

Every part of the bus that owns topology (the group plans in ``topology.py``,
the delay levels in ``delay.py``, the command queues in ``rpc.py``) describes
it with these three records and hands the list to :func:`apply`. One
vocabulary means one place that talks to the :class:`Transport` seam, one
shape the CLI prints (``banyan topology``) and one shape the tests compare;
a part that spoke its own dialect would need a translator and could drift.

The queue-argument helpers that more than one plan needs live here too, so an
argument such as RabbitMQ's at-least-once dead-lettering is spelled once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from banyan_bus.transport.base import Arguments, ExchangeType, HeaderValue, Transport

QueueType = Literal["quorum", "classic"]
"""Quorum (replicated, the default) or classic (needed for AMQP priorities on 3.10)."""


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    """A durable exchange, never auto-deleted."""

    durable: ClassVar[bool] = True  # the bus declares nothing that a broker restart forgets
    name: str
    type: ExchangeType
    arguments: Arguments = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class QueueDecl:
    """A durable queue with exactly these arguments.

    RabbitMQ refuses a redeclare with different arguments, so they are computed
    in one place per kind of queue and compared as a whole on conflict.
    """

    durable: ClassVar[bool] = True
    name: str
    arguments: Arguments = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class BindingDecl:
    """A binding from exchange ``source`` to a queue or exchange ``destination``."""

    source: str
    destination: str
    destination_kind: Literal["queue", "exchange"]
    routing_key: str = ""


Declaration = ExchangeDecl | QueueDecl | BindingDecl


def at_least_once_dead_lettering() -> dict[str, HeaderValue]:
    """Quorum-queue arguments that keep a dead-lettered message until its target confirmed it.

    The default strategy (at-most-once) may lose a message that dies while the
    broker crashes; ``at-least-once`` does not, and RabbitMQ accepts it only
    with ``reject-publish`` overflow (3.10+). Classic queues have no such
    strategy: their dead-lettering is always at-most-once.
    """
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


async def apply(transport: Transport, plan: Sequence[Declaration]) -> None:
    """Declare ``plan``; idempotent, ``TopologyMismatch`` on a conflict.

    A declaration the plan repeats (the commands exchange, once per command
    type) is made once. Where the transport takes several declarations at once
    (``Transport.declaring``: RabbitMQ, for a large plan), they are started in
    plan order, up to that many in flight, and a binding waits only for the
    declarations of its two ends (when the plan makes them): nothing else here
    depends on order (a queue's dead-letter exchange need not exist yet).
    Otherwise they are made one by one, in plan order. On a refusal no further
    declaration starts; the refusal of the earliest declaration in the plan is
    raised.
    """
    unique = list(dict.fromkeys(plan))
    async with transport.declaring(len(unique)) as width:
        if width <= 1:
            for decl in unique:
                await declare(transport, decl)
        else:
            await _side_by_side(transport, unique, width)


async def declare(transport: Transport, decl: Declaration) -> None:
    """Make one declaration on ``transport``."""
    if isinstance(decl, ExchangeDecl):
        await transport.declare_exchange(decl.name, decl.type, arguments=decl.arguments)
    elif isinstance(decl, QueueDecl):
        await transport.declare_queue(decl.name, arguments=decl.arguments)
    elif decl.destination_kind == "queue":
        await transport.bind_queue(decl.destination, decl.source, decl.routing_key)
    else:
        await transport.bind_exchange(decl.destination, decl.source, decl.routing_key)


class _NotMade(Exception):
    """An end a binding waits for was not declared: a declaration before it was refused."""


def _entity(decl: Declaration) -> tuple[str, str] | None:
    if isinstance(decl, ExchangeDecl):
        return ("exchange", decl.name)
    if isinstance(decl, QueueDecl):
        return ("queue", decl.name)
    return None


async def _side_by_side(transport: Transport, plan: list[Declaration], width: int) -> None:
    """``plan`` with up to ``width`` declarations in flight; the earliest refusal raised."""
    loop = asyncio.get_running_loop()
    # Each exchange and queue the plan declares: done once its declaration answered;
    # and where in the plan it is declared (a binding waits only for what comes before).
    made: dict[tuple[str, str], asyncio.Future[None]] = {}
    first: dict[tuple[str, str], int] = {}
    for index, decl in enumerate(plan):
        entity = _entity(decl)
        if entity is not None and entity not in made:
            made[entity], first[entity] = loop.create_future(), index
    pending = iter(enumerate(plan))
    refused: dict[int, BaseException] = {}

    async def worker() -> None:
        for index, decl in pending:  # one iterator: each declaration is taken once, in order
            entity = _entity(decl)
            if refused:  # not made: whatever waits for it gives up too
                if entity is not None and not made[entity].done():
                    made[entity].set_exception(_NotMade())
                return
            try:
                if isinstance(decl, BindingDecl):  # its ends first (declared earlier, if here)
                    ends = [("exchange", decl.source), (decl.destination_kind, decl.destination)]
                    for end in ends:
                        if first.get(end, index) < index:
                            await asyncio.shield(made[end])
                await declare(transport, decl)
            except Exception as exc:  # the transport's TopologyError, as a rule
                if not isinstance(exc, _NotMade):
                    refused[index] = exc
                if entity is not None and not made[entity].done():
                    made[entity].set_exception(exc)
                return
            if entity is not None and not made[entity].done():
                made[entity].set_result(None)

    try:
        await asyncio.gather(*(worker() for _ in range(min(width, len(plan)))))
    finally:
        for future in made.values():  # nobody waits for an end that was never declared
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
    if refused:
        raise refused[min(refused)]


async def declared_in_order(
    transport: Transport, plans: Sequence[Sequence[Declaration]], width: int
) -> AsyncGenerator[int, None]:
    """Declare ``plans`` (each with :func:`apply`), up to ``width`` of them side by side,
    and yield each one's index, in order, once it and every plan before it is declared.

    What the caller does with an index (start a consumer on what plan ``i`` declared)
    overlaps the declaring of the plans after it. A refusal is raised where its plan's
    index would have been yielded (so the earliest plan's); once the refused plan is
    over, no plan starts.
    Use with ``contextlib.aclosing`` so that leaving early stops the declaring.
    """
    loop = asyncio.get_running_loop()
    declared = [loop.create_future() for _ in plans]
    pending = iter(zip(plans, declared, strict=True))
    refused = False

    async def lane() -> None:
        nonlocal refused
        for plan, done in pending:
            if refused:
                return
            try:
                await apply(transport, plan)
            except Exception as exc:
                refused = True
                done.set_exception(exc)
                return
            done.set_result(None)

    lanes = [loop.create_task(lane()) for _ in range(max(1, min(width, len(plans))))]
    try:
        for index, done in enumerate(declared):
            await asyncio.shield(done)
            yield index
    finally:
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        for done in declared:
            if done.done() and not done.cancelled():
                done.exception()  # retrieved: no "never retrieved" warning
