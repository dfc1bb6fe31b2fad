"""The envelope always carries a valid W3C traceContext, with or without an OpenTelemetry
SDK, and a publish inside a handler continues the trace it received (same trace id, new
span id). Runs on memory:// and amqp://."""

from __future__ import annotations

import re

from banyan_bus import Event, MessageBus, MessageContext
from tests.support import wait_until

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


class SamovarHeated(Event):
    samovar_id: str


class ChaiSteeped(Event):
    samovar_id: str


async def test_every_envelope_has_a_trace_and_a_handler_continues_it(bus_url: str, unique) -> None:
    seen: dict[str, MessageContext] = {}
    bus = MessageBus(unique("tea-room"), bus_url)

    async def boil(event: SamovarHeated, ctx: MessageContext) -> None:
        seen["boiled"] = ctx
        await bus.publish(ChaiSteeped(samovar_id=event.samovar_id))

    async def brew(event: ChaiSteeped, ctx: MessageContext) -> None:
        seen["brewed"] = ctx

    await bus.subscribe(SamovarHeated, boil)
    await bus.subscribe(ChaiSteeped, brew)
    async with bus:
        await bus.publish(SamovarHeated(samovar_id="k1"))
        await wait_until(lambda: "brewed" in seen, timeout=10, what="the follow-up")

    first, second = seen["boiled"].trace_context, seen["brewed"].trace_context
    assert first is not None
    assert second is not None
    assert HEX32.match(first.trace_id)
    assert HEX16.match(first.span_id)
    assert first.trace_flags in ("00", "01")
    # The follow-up continues the trace: same trace id and flags, its own span id.
    assert second.trace_id == first.trace_id
    assert second.trace_flags == first.trace_flags
    assert HEX16.match(second.span_id)
    assert second.span_id != first.span_id
    # The traceparent header mirrors the envelope.
    traceparent = seen["brewed"].headers["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == second.trace_id


async def test_publishes_outside_handlers_start_their_own_traces(bus_url: str, unique) -> None:
    seen: list[MessageContext] = []

    async def boil(event: SamovarHeated, ctx: MessageContext) -> None:
        seen.append(ctx)

    bus = MessageBus(unique("tea-room"), bus_url)
    await bus.subscribe(SamovarHeated, boil)
    async with bus:
        for i in range(3):
            await bus.publish(SamovarHeated(samovar_id=f"k{i}"))
        await wait_until(lambda: len(seen) == 3, timeout=10, what="3 events")
    traces = {ctx.trace_context.trace_id for ctx in seen if ctx.trace_context is not None}
    assert len(traces) == 3
