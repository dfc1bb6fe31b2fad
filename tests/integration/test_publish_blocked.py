"""A publish the broker does not confirm in time fails loudly; it never reports success.

RabbitMQ under a memory alarm blocks every publishing connection: frames are not
read, confirms never come. ``rabbitmqctl set_vm_memory_high_watermark 0`` raises
that alarm on purpose (for every client of this broker, for a few seconds).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest

from banyan_bus import Event, MessageBus, PublishError
from tests.support import wait_until


class SignalJammed(Event):
    signal_id: str


def _rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to raise a memory alarm on the local broker")
    done = subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def _watermark() -> list[str]:
    """The broker's memory watermark now, as ``set_vm_memory_high_watermark`` arguments.

    A fraction (``0.4``) or ``{absolute, Bytes}``: whatever the operator configured is
    what the test puts back, not a constant of ours.
    """
    value = (
        _rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
        .strip()
        .splitlines()[-1]
    )
    if value.startswith("{absolute,"):
        return ["absolute", value.removeprefix("{absolute,").rstrip("}").strip()]
    float(value)  # fails the test loudly on an answer we do not understand
    return [value]


async def test_unconfirmed_publish_raises_after_publish_timeout(amqp_url: str) -> None:
    handled: list[str] = []

    async def handle(event: SignalJammed) -> None:
        handled.append(event.signal_id)

    bus = MessageBus("jammer", amqp_url, publish_timeout=1.5)
    await bus.subscribe(SignalJammed, handle)
    async with bus:
        await bus.publish(SignalJammed(signal_id="before"))
        await wait_until(lambda: handled == ["before"])
        previous = _watermark()
        _rabbitmqctl("set_vm_memory_high_watermark", "0")
        try:
            started = time.monotonic()
            with pytest.raises(PublishError, match="not confirmed"):
                await bus.publish(SignalJammed(signal_id="blocked"))
            waited = time.monotonic() - started
        finally:
            _rabbitmqctl("set_vm_memory_high_watermark", *previous)
        assert 1.4 <= waited < 10
        # The alarm cleared: the bus publishes again (the blocked frame may still be
        # delivered once the broker reads it; "raised" only means "not confirmed").
        await asyncio.sleep(0.5)
        await bus.publish(SignalJammed(signal_id="after"))
        await wait_until(lambda: "after" in handled, timeout=20)
