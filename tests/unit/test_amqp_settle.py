"""ChannelSettler: which frames go out, in which order, for a given pattern of settlements.

The channel is a stand-in with aiormq's bounded write queue; the frames written are
read back with pamqp, exactly as the broker would read them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp import frame as pamqp_frame

from banyan_bus.transport.amqp_settle import ChannelSettler


class FakeChannel:
    def __init__(self, maxsize: int = 10) -> None:
        self.number = 3
        self.is_closed = False
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue(maxsize=maxsize)

    def written(self) -> list[list[Any]]:
        """Each queued ChannelFrame as the list of its frames (pamqp objects)."""
        batches = []
        while not self.write_queue.empty():
            payload = self.write_queue.get_nowait().payload
            frames = []
            while payload:
                used, channel, frame = pamqp_frame.unmarshal(payload)
                assert channel == self.number
                frames.append(frame)
                payload = payload[used:]
            batches.append(frames)
        return batches


def _describe(frame: Any) -> tuple[Any, ...]:
    if isinstance(frame, spec.Basic.Ack):
        return ("ack", frame.delivery_tag, frame.multiple)
    if isinstance(frame, spec.Basic.Nack):
        return ("nack", frame.delivery_tag, frame.requeue)
    if isinstance(frame, spec.Basic.Reject):
        return ("reject", frame.delivery_tag)
    raise AssertionError(f"unexpected frame {frame!r}")


async def _turn() -> None:
    """Let the settler's call_soon flush run."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _settler(channel: FakeChannel, tags: range) -> ChannelSettler:
    settler = ChannelSettler(channel)  # type: ignore[arg-type]  # the parts it uses
    for tag in tags:
        settler.delivered(tag)
    return settler


async def test_consecutive_acks_in_one_turn_become_one_multiple_ack() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 101))
    for tag in range(1, 101):
        settler.ack(tag)
    await _turn()
    assert [[_describe(f) for f in batch] for batch in channel.written()] == [[("ack", 100, True)]]


async def test_a_slow_delivery_does_not_hold_back_later_acks() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 6))
    for tag in (2, 3, 5):
        settler.ack(tag)
    await _turn()
    # 1 is still running: 2, 3 and 5 go out one by one, so the prefetch window moves on.
    assert [_describe(f) for f in channel.written()[0]] == [
        ("ack", 2, False),
        ("ack", 3, False),
        ("ack", 5, False),
    ]
    settler.ack(1)
    settler.ack(4)
    await _turn()
    # Everything up to 5 is settled now; the multiple ack names 4 — acked in this turn,
    # so unacknowledged at the broker, as RabbitMQ requires — and covers 1 and 4.
    assert [_describe(f) for f in channel.written()[0]] == [("ack", 4, True)]


async def test_nacks_and_rejects_go_before_the_multiple_ack_that_passes_them() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 6))
    settler.ack(1)
    settler.nack(2, requeue=True)
    settler.ack(3)
    settler.reject(4)
    settler.ack(5)
    await _turn()
    assert [_describe(f) for f in channel.written()[0]] == [
        ("nack", 2, True),
        ("reject", 4),
        ("ack", 5, True),
    ]


async def test_acks_of_several_turns_each_go_out_once() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 31))
    sent: list[tuple[Any, ...]] = []
    for start in (1, 11, 21):
        for tag in range(start + 9, start - 1, -1):  # out of order within the turn
            settler.ack(tag)
        await _turn()
        sent += [_describe(f) for batch in channel.written() for f in batch]
    assert sent == [("ack", 10, True), ("ack", 20, True), ("ack", 30, True)]


async def test_a_closed_channel_gets_nothing() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 3))
    settler.ack(1)
    channel.is_closed = True
    settler.ack(2)
    await _turn()
    assert channel.written() == []
    assert settler.closed


async def test_a_full_write_queue_keeps_the_order() -> None:
    channel = FakeChannel(maxsize=1)
    settler = _settler(channel, range(1, 5))
    settler.ack(2)  # held back by 1: goes out alone
    await _turn()
    settler.nack(1, requeue=False)  # the queue is full now: these wait, in order
    await _turn()
    settler.ack(3)
    await _turn()
    settler.ack(4)
    await _turn()
    got: list[tuple[Any, ...]] = []
    for _ in range(4):
        got += [_describe(f) for batch in channel.written() for f in batch]
        await _turn()
    assert got == [("ack", 2, False), ("nack", 1, False), ("ack", 3, True), ("ack", 4, True)]


async def test_drain_waits_until_the_writer_took_everything() -> None:
    channel = FakeChannel()
    settler = _settler(channel, range(1, 3))
    settler.ack(1)
    settler.ack(2)
    drained = asyncio.ensure_future(settler.drain())
    await _turn()
    assert not drained.done()
    first = channel.write_queue.get_nowait()
    marker = channel.write_queue.get_nowait()
    assert _describe(pamqp_frame.unmarshal(first.payload)[2]) == ("ack", 2, True)
    assert marker.payload == b""
    assert not drained.done()
    marker.drain()  # what aiormq's writer does once the socket took the bytes
    await drained
