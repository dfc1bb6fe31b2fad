"""Start-up stays linear in the number of subscriptions (issue #20: 10,000 on memory://).

What was quadratic, and is pinned here without timing anything:

* each bind on the memory broker compared the new binding with every binding of its
  exchange (the root exchange holds two per subscription);
* ``ContractRegistry.versions`` sorted the whole registry, once per subscription at
  start and once per decoded message;
* an ordered subscription re-declared its group's whole stream, once per type.

The guard counts the steps a start makes (function calls and Python lines, loop
iterations included: ``sys.setprofile`` and ``sys.settrace``) for 200 and for 2,000
subscriptions of distinct event types: linear work grows ten times, the old start
grew twenty to a hundred times. Steps, not seconds: the count does not depend on the
machine or its load. (Work inside one C call, a ``sorted`` or a ``set()`` of every
subscription, is one step: the tracer cannot see it grow.)
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from banyan_bus import Event, MessageBus
from banyan_bus.contracts import ContractRegistry, registry
from banyan_bus.topology import ExchangeDecl, QueueDecl
from banyan_bus.transport.memory import drop_broker
from banyan_bus.transport.memory.exchange import Binding, Exchange


@pytest.fixture(autouse=True)
def _forget_contracts() -> Iterator[None]:
    by_key = dict(registry._by_key)
    by_type = {t: dict(versions) for t, versions in registry._by_type.items()}
    yield
    registry._by_key.clear()
    registry._by_key.update(by_key)
    registry._by_type.clear()
    registry._by_type.update(by_type)


def _contracts(prefix: str, n: int) -> list[type[Event]]:
    def body(ns: dict[str, Any]) -> None:
        ns["__annotations__"] = {"seq": int}
        ns["__module__"] = __name__

    return [types.new_class(f"{prefix}{i}Measured", (Event,), {}, body) for i in range(n)]


async def _noop(event: Event) -> None:
    pass


def _steps_to_start(prefix: str, n: int, **subscribe: Any) -> int:
    """Steps of subscribing ``n`` types and starting the bus: function calls (Python
    and C) and Python lines run, loop iterations included (``sys.settrace`` reports a
    line each time a loop goes round, comprehensions too)."""
    contracts = _contracts(prefix, n)
    url = f"memory://startup-scale-{prefix}"
    bus = MessageBus("scale", url=url)
    steps = 0

    def on_c_call(frame: FrameType, event: str, arg: object) -> None:
        nonlocal steps
        if event == "c_call":
            steps += 1

    def on_line(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal steps
        steps += 1
        return on_line

    async def run() -> None:
        sys.setprofile(on_c_call)
        sys.settrace(on_line)
        try:
            for contract in contracts:
                await bus.subscribe(contract, _noop, **subscribe)
            await bus.start()
        finally:
            sys.settrace(None)
            sys.setprofile(None)
        await bus.stop()

    try:
        asyncio.run(run())
    finally:
        drop_broker(url)
    return steps


@pytest.mark.parametrize(
    "subscribe",
    [{}, {"ordered": True}],
    ids=["one subscription per type", "one ordered stream of every type"],
)
def test_start_up_calls_grow_linearly_with_subscriptions(subscribe: dict[str, Any]) -> None:
    tag = "Ordered" if subscribe else "Plain"
    small = _steps_to_start(f"Small{tag}", 200, **subscribe)
    large = _steps_to_start(f"Large{tag}", 2_000, **subscribe)
    # Linear: about 10x (a little less: the delay levels and the root are declared once).
    # The quadratic start this guards against made about 100x.
    assert large < 12 * small, (small, large, large / small)


def test_the_registry_answers_versions_by_type_oldest_first() -> None:
    reg = ContractRegistry()

    def contract(version: int) -> type[Event]:
        def body(ns: dict[str, Any]) -> None:
            ns["__annotations__"] = {"seq": int}
            ns["__module__"] = __name__

        cls = types.new_class(
            f"ScaleOrderedV{version}", (Event,), {"name": "ScaleOrdered", "version": version}, body
        )
        reg.register(cls)
        return cls

    v3, v1, v2 = contract(3), contract(1), contract(2)
    assert reg.versions("ScaleOrdered") == {1: v1, 2: v2, 3: v3}
    assert list(reg.versions("ScaleOrdered")) == [1, 2, 3]
    reg.versions("ScaleOrdered").clear()  # a copy: the caller cannot change the registry
    assert reg.get("ScaleOrdered", 2) is v2
    assert len(reg.versions("ScaleOrdered")) == 3
    assert reg.versions("NeverDefined") == {}


# -- the memory broker's binding indexes -----------------------------------------------


def _b(destination: str, key: str, *, to_exchange: bool = False) -> Binding:
    return Binding(destination, to_exchange, key, {})


def test_topic_bindings_match_in_binding_order_literal_and_wildcard_alike() -> None:
    topic = Exchange("t", "topic", True, {})
    made = [
        _b("q1", "a.b"),
        _b("q2", "#"),
        _b("q3", "*.b"),
        _b("q4", "x.#.b"),
        _b("q5", "a.*"),
        _b("q6", "b"),
        _b("q7", ""),
    ]
    for binding in made:
        topic.bind(binding)
    topic.bind(_b("q1", "a.b"))  # the same binding again: nothing changes
    assert topic.bindings == made
    assert [b.destination for b in topic.matching("a.b", {})] == ["q1", "q2", "q3", "q5"]
    assert [b.destination for b in topic.matching("x.y.b", {})] == ["q2", "q4"]
    assert [b.destination for b in topic.matching("b", {})] == ["q2", "q6"]
    assert [b.destination for b in topic.matching("", {})] == ["q2", "q7"]
    topic.unbind("q3", to_exchange=False)
    topic.unbind("q1", to_exchange=False)
    assert [b.destination for b in topic.matching("a.b", {})] == ["q2", "q5"]
    topic.bind(_b("q1", "a.b"))  # bound again: now the newest
    assert [b.destination for b in topic.matching("a.b", {})] == ["q2", "q5", "q1"]


def test_direct_and_fanout_bindings_and_unbinding_by_destination() -> None:
    direct = Exchange("d", "direct", True, {})
    direct.bind(_b("q1", "k"))
    direct.bind(_b("e1", "k", to_exchange=True))
    direct.bind(_b("q2", "other"))
    assert [b.destination for b in direct.matching("k", {})] == ["q1", "e1"]
    direct.unbind("e1", to_exchange=False)  # a queue of that name: not the exchange
    assert [b.destination for b in direct.matching("k", {})] == ["q1", "e1"]
    direct.unbind("e1", to_exchange=True)
    assert [b.destination for b in direct.matching("k", {})] == ["q1"]
    fanout = Exchange("f", "fanout", True, {})
    for name in ("q1", "q2", "q3"):
        fanout.bind(_b(name, ""))
    fanout.unbind("q2", to_exchange=False)
    assert [b.destination for b in fanout.matching("anything", {})] == ["q1", "q3"]


def test_an_ordered_stream_is_planned_once_whatever_its_number_of_types() -> None:
    bus = MessageBus("scale-plan", url="memory://startup-scale-plan")

    async def run() -> None:
        for contract in _contracts("Planned", 5):
            await bus.subscribe(contract, _noop, ordered=True)

    asyncio.run(run())
    plan = bus.topology()
    names = [d.name for d in plan if isinstance(d, ExchangeDecl | QueueDecl)]
    assert len(names) == len(set(names)), "an exchange or queue is planned twice"
