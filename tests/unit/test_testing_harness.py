"""banyan_bus.testing: record publishes, wait until idle, read the DLQ — on memory://."""

from __future__ import annotations

from banyan_bus import Event, MessageBus, RetryPolicy
from banyan_bus.testing import TestBroker


class KettleBoiled(Event):
    kettle_id: str


class TeaPoured(Event):
    cups: int


async def test_records_publishes_waits_until_idle_and_reads_the_dlq() -> None:
    async with TestBroker() as broker:
        kitchen = broker.bus("kitchen", retry=RetryPolicy.none())

        @kitchen.handler(KettleBoiled)
        async def pour(event: KettleBoiled) -> None:
            if event.kettle_id == "broken":
                raise RuntimeError("no water")
            await kitchen.publish(TeaPoured(cups=2))

        async with kitchen, broker.bus("guest") as guest:
            await guest.publish(KettleBoiled(kettle_id="k1"))
            await guest.publish(KettleBoiled(kettle_id="broken"))
            await broker.wait_idle()
            assert broker.events(TeaPoured) == [TeaPoured(cups=2)]
            assert [e.kettle_id for e in broker.events(KettleBoiled)] == ["k1", "broken"]
            [dead] = await broker.dead_letters(kitchen, KettleBoiled)
            assert dead.reason == "handler-failed"
            assert dead.exception_message == "no water"


async def test_each_harness_is_a_private_broker() -> None:
    async with TestBroker() as first, TestBroker() as second:
        assert first.url != second.url
        async with MessageBus("a", first.url) as bus:
            await bus.publish(TeaPoured(cups=1))
        assert len(first.events(TeaPoured)) == 1
        assert second.events(TeaPoured) == []
