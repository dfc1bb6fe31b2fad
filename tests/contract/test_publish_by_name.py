"""publish("OrderPlaced", {...}): a registered message type's name with a dict, as platform
code writes it. Runs on memory:// and amqp://."""

from __future__ import annotations

import pytest

from banyan_bus import Event, MessageBus, MessageContext
from banyan_bus.errors import ContractError
from tests.support import wait_until


class SaplingPlanted(Event):
    sapling_id: str


class SaplingPlantedV2(Event, name="SaplingPlanted", version=2):
    sapling_id: str
    species: str = "oak"


async def test_a_name_publishes_the_oldest_version_or_the_pinned_one(bus_url: str, unique) -> None:
    seen: list[tuple[str, int]] = []

    async def plant(event: SaplingPlanted, ctx: MessageContext) -> None:
        seen.append((event.sapling_id, ctx.version))

    bus = MessageBus(unique("nursery"), bus_url)
    await bus.subscribe(SaplingPlanted, plant)
    pinned = MessageBus(unique("grower"), bus_url, publish_versions={"SaplingPlanted": 2})
    async with bus, pinned:
        await bus.publish("SaplingPlanted", {"saplingId": "s1"})
        await pinned.publish("SaplingPlanted", {"sapling_id": "s2", "species": "elm"})
        await wait_until(lambda: len(seen) == 2, timeout=10, what="both events")
    assert sorted(seen) == [("s1", 1), ("s2", 2)]


async def test_an_unknown_name_is_refused_with_a_hint(memory_url: str) -> None:
    bus = MessageBus("nursery", memory_url)
    async with bus:
        with pytest.raises(ContractError, match="Did you mean 'SaplingPlanted'"):
            await bus.publish("SaplingPlantd", {"saplingId": "s1"})
        with pytest.raises(ContractError, match="needs the event's data"):
            await bus.publish("SaplingPlanted")  # type: ignore[call-overload]
