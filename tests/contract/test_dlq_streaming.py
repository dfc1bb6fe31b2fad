"""DLQ tooling streams (issue 16 §6): find/replay/purge by id hold at most ``window`` unacked.

A DLQ of a few thousand small records; ``window=100``. Runs on memory:// and amqp://.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from banyan_bus import Event, MessageBus, RetryPolicy
from banyan_bus.dlq import DeadLetterQueue
from banyan_bus.envelope import encode
from banyan_bus.transport.base import DEFAULT_EXCHANGE
from tests.support import wait_until

RECORDS = 3000
WINDOW = 100


class LatheStopped(Event):
    lathe_id: str


async def _count_settles(dlq: DeadLetterQueue, expected: int) -> int:
    for _ in range(200):  # a give-back is applied asynchronously (quorum queues)
        count = await dlq.count()
        if count == expected:
            return count
        await asyncio.sleep(0.05)
    return await dlq.count()


async def test_find_replay_and_purge_by_id_stream_a_large_dlq(
    bus_url: str, unique: Callable[[str], str]
) -> None:
    handled: list[str] = []

    async def handle(event: LatheStopped) -> None:
        handled.append(event.lathe_id)

    group = unique("lathe")
    bus = MessageBus(group, bus_url, retry=RetryPolicy(immediate=0, delayed=0))
    sub = await bus.subscribe(LatheStopped, handle)
    async with bus:
        ids = []
        for i in range(RECORDS):
            message = encode(LatheStopped(lathe_id=f"l{i}"), service_name="mill")
            ids.append(message.message_id)
            await bus.transport.publish(DEFAULT_EXCHANGE, sub.dlq_name, message, confirm=True)
        dlq = DeadLetterQueue(bus.transport, group, LatheStopped, window=WINDOW)
        assert await _count_settles(dlq, RECORDS) == RECORDS

        found = await dlq.find(ids[2500])
        assert found is not None
        assert found.ref == ids[2500]
        assert 0 < dlq.peak_unacked <= WINDOW, dlq.peak_unacked
        assert await _count_settles(dlq, RECORDS) == RECORDS

        assert await dlq.find("evt_not_there") is None  # a full pass, still bounded
        assert 0 < dlq.peak_unacked <= WINDOW, dlq.peak_unacked
        assert await _count_settles(dlq, RECORDS) == RECORDS

        result = await dlq.replay(ids=[ids[2999], ids[7], "evt_missing"])
        assert sorted(result.replayed) == sorted([ids[2999], ids[7]])
        assert result.missing == ["evt_missing"]
        assert dlq.peak_unacked <= WINDOW, dlq.peak_unacked
        await wait_until(lambda: sorted(handled) == ["l2999", "l7"], timeout=10)

        assert await dlq.purge(ids=[ids[10], ids[1500]]) == 2
        assert dlq.peak_unacked <= WINDOW, dlq.peak_unacked
        assert await _count_settles(dlq, RECORDS - 4) == RECORDS - 4
        # Nothing lost or doubled by the rotations: every other record is still there once.
        left = {ref for ref in ids} - {ids[2999], ids[7], ids[10], ids[1500]}
        assert await dlq.find(ids[10]) is None
        assert (await dlq.find(ids[1499])) is not None
        assert len(left) == RECORDS - 4
