"""Two stages on one broker never see each other's events (``MessageBus(stage=...)``).

Each stage is a vhost named after it; the test creates both vhosts (granting
the test user rights on them, as an operator grants each stage's user rights on
its own) and deletes them afterwards. The same service, group and event in both
stages: an event published in one is handled there and only there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest

from banyan_bus import Event, MessageBus
from banyan_bus.topology import group_exchange
from tests import brokers

pytestmark = pytest.mark.amqp


class LedgerStaged(Event):
    ledger_id: str
    stage: str


@pytest.fixture
def stages() -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = (f"banyan-test-stage-a-{suffix}", f"banyan-test-stage-b-{suffix}")
    for name in names:
        brokers.create_vhost(name)
    try:
        yield names
    finally:
        for name in names:
            if not brokers.retire_vhost(name):
                brokers.delete_vhost(name)


async def test_two_stages_on_one_broker_never_see_each_others_events(
    stages: tuple[str, str],
) -> None:
    base = brokers.amqp_base_url()
    received: dict[str, list[LedgerStaged]] = {stage: [] for stage in stages}
    done = {stage: asyncio.Event() for stage in stages}
    buses = []

    def handler(stage: str) -> Callable[[LedgerStaged], Awaitable[None]]:
        async def handle(event: LedgerStaged) -> None:
            received[stage].append(event)
            done[stage].set()

        return handle

    for stage in stages:
        bus = MessageBus("stage-ledger", base, stage=stage)
        await bus.subscribe(LedgerStaged, handler(stage))
        buses.append(bus)
    for bus in buses:
        await bus.start()
    try:
        for bus, stage in zip(buses, stages, strict=True):
            assert brokers.vhost_from_url(bus.url) == stage
            await bus.publish(LedgerStaged(ledger_id=f"led-{stage}", stage=stage))
        async with asyncio.timeout(15):
            for stage in stages:
                await done[stage].wait()
        await asyncio.sleep(0.5)  # time for a stray copy to arrive, if one were routed
    finally:
        for bus in buses:
            await bus.stop()
    for stage in stages:
        assert [e.stage for e in received[stage]] == [stage]
        queues = {q["name"] for q in brokers.list_queues(stage)}
        assert group_exchange("stage-ledger", "LedgerStaged") in queues
