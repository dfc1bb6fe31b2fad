"""``declarations.apply`` with several declarations in flight (what RabbitMQ is given).

A transport that says a batch may have N declarations in flight
(``Transport.declaring``) gets them in plan order, at most N at once; a binding
starts only once both its ends (declared earlier in the plan) answered; a
repeated declaration is made once; after a refusal nothing new starts, and the
refusal raised is the earliest in the plan. ``declared_in_order`` (how the bus
starts each subscription's consumer while the next ones are declared) yields
each plan once it and those before it are declared. The memory transport is used with
slow declarations, so they overlap as on a broker.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext

import pytest

from banyan_bus.declarations import (
    BindingDecl,
    Declaration,
    ExchangeDecl,
    QueueDecl,
    apply,
    declared_in_order,
)
from banyan_bus.errors import TopologyError, TopologyMismatch
from banyan_bus.transport.base import Arguments, ExchangeType
from banyan_bus.transport.memory import MemoryTransport, drop_broker


class SlowTransport(MemoryTransport):
    """Declarations that take a while, side by side, with a record of what overlapped."""

    def __init__(self, width: int) -> None:
        super().__init__(f"memory://{uuid.uuid4().hex}")
        self.width = width
        self.in_flight = 0
        self.most_in_flight = 0
        self.started: list[str] = []
        self.answered: list[str] = []
        self.log: list[tuple[str, str]] = []  # ("start" | "answer" | "refuse", what), in order
        self.refuse: set[str] = set()
        self._random = random.Random(7)

    def declaring(self, count: int, *, consumers: int = 0) -> AbstractAsyncContextManager[int]:
        return nullcontext(self.width)

    def _answered(self, what: str) -> None:
        self.answered.append(what)
        self.log.append(("answer", what))

    async def _slowly(self, what: str) -> None:
        self.started.append(what)
        self.log.append(("start", what))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self._random.random() / 500)
            if what in self.refuse:
                self.log.append(("refuse", what))
                raise TopologyError(f"{what}: refused")
        finally:
            self.in_flight -= 1

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
    ) -> None:
        await self._slowly(f"exchange {name}")
        await super().declare_exchange(name, type, durable=durable, arguments=arguments)
        self._answered(f"exchange {name}")

    async def declare_queue(
        self, name: str, *, durable: bool = True, arguments: Arguments | None = None
    ) -> None:
        await self._slowly(f"queue {name}")
        await super().declare_queue(name, durable=durable, arguments=arguments)
        self._answered(f"queue {name}")

    async def bind_queue(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments | None = None
    ) -> None:
        await self._slowly(f"bind {exchange} -> {queue}")
        await super().bind_queue(queue, exchange, routing_key, arguments)
        self._answered(f"bind {exchange} -> {queue}")

    async def bind_exchange(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Arguments | None = None,
    ) -> None:
        await self._slowly(f"bind {source} -> {destination}")
        await super().bind_exchange(destination, source, routing_key, arguments)
        self._answered(f"bind {source} -> {destination}")


def _plan(groups: int) -> list[Declaration]:
    plan: list[Declaration] = [ExchangeDecl("root", "topic")]
    for g in range(groups):
        plan += [
            QueueDecl(f"dlq{g}"),
            ExchangeDecl(f"ex{g}", "fanout"),
            QueueDecl(f"q{g}"),
            BindingDecl(f"ex{g}", f"q{g}", "queue"),
            BindingDecl("root", f"ex{g}", "exchange", f"key{g}"),
            ExchangeDecl("root", "topic"),  # repeated: made once
        ]
    return plan


async def _run(transport: SlowTransport, plan: list[Declaration]) -> None:
    await transport.connect()
    try:
        await apply(transport, plan)
    finally:
        await transport.close()
        drop_broker(transport.url)


async def test_every_declaration_is_made_once_with_several_in_flight() -> None:
    transport = SlowTransport(width=4)
    await _run(transport, _plan(30))
    assert transport.most_in_flight == 4
    assert len(transport.answered) == 1 + 30 * 5
    assert len(set(transport.answered)) == len(transport.answered)
    assert transport.started[0] == "exchange root"


async def test_a_binding_starts_only_after_both_its_ends_answered() -> None:
    transport = SlowTransport(width=8)
    await _run(transport, _plan(30))
    for g in range(30):
        for binding, ends in [
            (f"bind ex{g} -> q{g}", [f"exchange ex{g}", f"queue q{g}"]),
            (f"bind root -> ex{g}", ["exchange root", f"exchange ex{g}"]),
        ]:
            started = transport.log.index(("start", binding))
            answered = [transport.log.index(("answer", end)) for end in ends]
            assert all(a < started for a in answered), (binding, started, answered)


async def test_the_earliest_refusal_is_raised_and_nothing_new_starts_after_it() -> None:
    transport = SlowTransport(width=4)
    transport.refuse = {"queue q12", "queue q20"}
    with pytest.raises(TopologyError, match="q12: refused"):
        await _run(transport, _plan(30))
    # q12's bindings never start, and the plan stops within a width of the refusal.
    assert "bind ex12 -> q12" not in transport.started
    last = max(int(w.split()[-1].removeprefix("q")) for w in transport.started if "queue q" in w)
    assert last <= 14


async def test_a_mismatch_in_a_batch_names_the_queue_and_both_argument_sets() -> None:
    transport = SlowTransport(width=4)
    plan = _plan(10)
    plan.insert(20, QueueDecl("q2", {"x-max-length": 5}))  # q2 again, other arguments
    with pytest.raises(TopologyMismatch) as info:
        await _run(transport, plan)
    assert info.value.name == "q2"
    assert info.value.requested == {"durable": True, "x-max-length": 5}
    assert info.value.existing == {"durable": True}


async def test_one_at_a_time_keeps_plan_order() -> None:
    transport = SlowTransport(width=1)
    plan = _plan(5)
    await _run(transport, plan)
    assert transport.most_in_flight == 1
    assert len(transport.started) == 1 + 5 * 5


async def test_plans_are_yielded_in_order_each_once_declared_and_a_refusal_where_it_was() -> None:
    transport = SlowTransport(width=4)
    await transport.connect()
    plans = [_plan(1), *[[QueueDecl(f"solo{i}")] for i in range(1, 31)]]
    plans[7] = [QueueDecl("solo7"), QueueDecl("refused7")]
    transport.refuse = {"queue refused7"}
    seen: list[int] = []

    async def consume_in_order() -> None:
        async with aclosing(declared_in_order(transport, plans, 4)) as declared:
            async for index in declared:
                # Everything of this plan, and of the plans before it, has answered.
                for plan in plans[: index + 1]:
                    for decl in plan:
                        if isinstance(decl, QueueDecl):
                            assert f"queue {decl.name}" in transport.answered
                seen.append(index)

    try:
        with pytest.raises(TopologyError, match="refused7: refused"):
            await consume_in_order()
    finally:
        await transport.close()
        drop_broker(transport.url)
    assert seen == list(range(7))
    # The plans after it stop: once the refused plan is over, no lane takes another.
    assert "queue solo30" not in transport.started
