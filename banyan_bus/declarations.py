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


async def apply(transport: Transport, plan: list[Declaration]) -> None:
    """Declare ``plan`` in order; idempotent, ``TopologyMismatch`` on a conflict.

    Order matters: an exchange-to-exchange binding needs both ends, and a queue's
    dead-letter target should exist before anything expires into it.
    """
    for decl in plan:
        if isinstance(decl, ExchangeDecl):
            await transport.declare_exchange(decl.name, decl.type, arguments=decl.arguments)
        elif isinstance(decl, QueueDecl):
            await transport.declare_queue(decl.name, arguments=decl.arguments)
        elif decl.destination_kind == "queue":
            await transport.bind_queue(decl.destination, decl.source, decl.routing_key)
        else:
            await transport.bind_exchange(decl.destination, decl.source, decl.routing_key)
