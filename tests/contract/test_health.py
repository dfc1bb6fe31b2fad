"""``bus.health()`` and the probe server's ``/livez`` ``/readyz``, on both transports.

The probes are exercised over real HTTP (a ``ProbeServer`` on a free port, read with
``urllib`` in a thread so the event loop keeps serving). The flip to 503 on a lost
broker connection and back on recovery is in ``tests/integration/test_health_http.py``
(RabbitMQ reconnects; ``memory://`` does not).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from banyan_bus import Event, MessageBus
from banyan_bus.probes import ProbeServer
from banyan_bus.transport.memory.broker import get_broker


class HealthParcelWeighed(Event):
    parcel_id: str
    grams: int


async def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` from the probe server over HTTP; (status, JSON body)."""

    def fetch() -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(fetch)


async def test_health_reports_connection_consumers_and_round_trip(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    group = unique("weigh")
    bus = MessageBus(service=unique("health"), url=bus_url)

    async def weigh(event: HealthParcelWeighed) -> None:
        pass

    await bus.subscribe(HealthParcelWeighed, weigh, subscription_group=group)
    before = await bus.health()
    assert before.state == "stopped"
    assert not before.ready
    assert not before.connected
    async with bus:
        report = await bus.health()
        assert report.ready, report.problems
        assert report.healthy, report.problems
        assert report.state == "running"
        assert report.connected
        assert report.confirms_flowing
        assert report.round_trip_s is not None
        assert report.round_trip_s < 2.0
        assert report.last_round_trip is not None
        [consumer] = report.consumers
        assert (consumer.kind, consumer.group, consumer.message_type) == (
            "event",
            group,
            HealthParcelWeighed.__message_type__,
        )
        assert consumer.consuming
        assert report.problems == ()
        # A second probe within the second reuses the round-trip.
        again = await bus.health()
        assert again.last_round_trip == report.last_round_trip
    after = await bus.health()
    assert after.state == "stopped"
    assert not after.ready
    assert "the bus is stopped" in after.problems


async def test_readyz_is_503_until_started_and_while_draining(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    bus = MessageBus(service=unique("probed"), url=bus_url, grace_period=10)
    release = asyncio.Event()
    started = asyncio.Event()

    async def weigh(event: HealthParcelWeighed) -> None:
        started.set()
        await release.wait()

    await bus.subscribe(HealthParcelWeighed, weigh)
    async with ProbeServer(bus, port=0, host="127.0.0.1") as server:
        status, body = await get(server.port, "/livez")
        assert (status, body["live"], body["state"]) == (200, True, "stopped")
        status, body = await get(server.port, "/readyz")
        assert status == 503
        assert body["ready"] is False
        await bus.start()
        status, body = await get(server.port, "/readyz")
        assert status == 200, body
        assert body["ready"] is True
        assert body["consumers"][0]["consuming"] is True
        await bus.publish(HealthParcelWeighed(parcel_id="p1", grams=250))
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.create_task(bus.stop())
        for _ in range(100):
            if bus.state == "draining":
                break
            await asyncio.sleep(0.01)
        status, body = await get(server.port, "/readyz")
        assert status == 503
        assert body["state"] == "draining"
        status, body = await get(server.port, "/livez")
        assert status == 200  # draining is alive: no restart in the middle of a graceful stop
        release.set()
        await asyncio.wait_for(stopping, 20)
        status, body = await get(server.port, "/readyz")
        assert (status, body["state"]) == (503, "stopped")
        status, _ = await asyncio.to_thread(_status_of, server.port, "/nope")
        assert status == 404


def _status_of(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_readyz_is_503_once_the_memory_connection_is_lost(
    memory_url: str, unique: Callable[[str], str]
) -> None:
    bus = MessageBus(service=unique("lost"), url=memory_url)

    async def weigh(event: HealthParcelWeighed) -> None:
        pass

    await bus.subscribe(HealthParcelWeighed, weigh)
    async with bus, ProbeServer(bus, port=0, host="127.0.0.1") as server:
        assert (await get(server.port, "/readyz"))[0] == 200
        get_broker(memory_url).close_all_connections()
        status, body = await get(server.port, "/readyz")
        assert status == 503
        assert body["connected"] is False
        assert any("not connected" in p for p in body["problems"])
