"""deliver_directly: banyan's deliveries leave aiormq's channel reader without a task of
aiormq's; everything else keeps aiormq's path. A stand-in channel, no broker."""

from __future__ import annotations

import asyncio
from typing import Any

from pamqp import commands as spec

from banyan_bus.transport.amqp_consumer import deliver_directly


class StandInChannel:
    """The parts of aiormq's Channel that deliver_directly uses, recording what ran."""

    def __init__(self) -> None:
        self.consumers: dict[str, Any] = {}
        self.by_aiormq: list[str | None] = []

    async def _Channel__get_content_header(self) -> str:  # aiormq's name, mangled
        return "header"

    async def _read_content(self, frame: spec.Basic.Deliver, header: str) -> tuple[str, str]:
        return (frame.consumer_tag or "", header)

    async def _on_deliver_frame(self, frame: spec.Basic.Deliver) -> None:
        self.by_aiormq.append(frame.consumer_tag)


def _deliver(channel: Any, tag: str) -> None:
    asyncio.run(channel._on_deliver_frame(spec.Basic.Deliver(consumer_tag=tag, delivery_tag=1)))


def test_our_tag_goes_straight_to_dispatch_the_rest_to_aiormq() -> None:
    channel = StandInChannel()
    got: list[Any] = []
    assert deliver_directly(channel, "ours", got.append)  # type: ignore[arg-type]
    channel.consumers["ours"] = object()
    _deliver(channel, "ours")
    _deliver(channel, "theirs")
    del channel.consumers["ours"]  # aiormq forgets a cancelled consumer
    _deliver(channel, "ours")
    assert got == [("ours", "header")]
    assert channel.by_aiormq == ["theirs", "ours"]


def test_installed_once_per_channel_and_a_renewed_consumer_gets_the_new_dispatch() -> None:
    channel = StandInChannel()
    first: list[Any] = []
    second: list[Any] = []
    assert deliver_directly(channel, "ours", first.append)  # type: ignore[arg-type]
    assert deliver_directly(channel, "ours", second.append)  # type: ignore[arg-type]
    channel.consumers["ours"] = object()
    _deliver(channel, "ours")
    assert (first, second) == ([], [("ours", "header")])


def test_a_failing_dispatch_is_logged_and_the_reader_goes_on() -> None:
    channel = StandInChannel()

    def explode(message: Any) -> None:
        raise ValueError("hostile")

    assert deliver_directly(channel, "ours", explode)  # type: ignore[arg-type]
    channel.consumers["ours"] = object()
    _deliver(channel, "ours")  # does not raise into aiormq's reader


def test_without_aiormqs_internals_nothing_changes() -> None:
    class Other:
        consumers: dict[str, Any] = {}

        async def _on_deliver_frame(self, frame: spec.Basic.Deliver) -> None:
            return None

    other = Other()
    assert not deliver_directly(other, "ours", print)  # type: ignore[arg-type]
    assert "_on_deliver_frame" not in vars(other)
