"""A command or query goes through the same delivery frame as an event: its log
context, its handler deadline (one ``Deadlines`` timer per consumer, not
``asyncio.timeout``), safe settling. Runs on memory:// and amqp://."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from banyan_bus import (
    Command,
    CommandHandler,
    MessageBus,
    MessageContext,
    RemoteHandlerError,
)
from banyan_bus.deadlines import Deadlines


class WeighParcel(Command):
    parcel_id: str
    slow: float = 0.0


@CommandHandler(WeighParcel, timeout=0.3)
class WeighParcelHandler:
    cancelled: list[str] = []
    contexts: list[MessageContext] = []

    async def handle(self, command: WeighParcel, ctx: MessageContext) -> int:
        self.contexts.append(ctx)
        structlog.get_logger("scales").info("weighing", parcel_id=command.parcel_id)
        try:
            await asyncio.sleep(command.slow)
        except asyncio.CancelledError:
            self.cancelled.append(command.parcel_id)
            raise
        return len(command.parcel_id)


@pytest.fixture
def captured() -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []

    def keep(_: object, __: str, event_dict: dict[str, object]) -> dict[str, object]:
        lines.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    yield lines
    structlog.reset_defaults()


async def test_a_command_past_its_timeout_is_cancelled_by_the_consumers_deadline(
    bus_url: str, unique, captured: list[dict[str, object]]
) -> None:
    WeighParcelHandler.cancelled = []
    WeighParcelHandler.contexts = []
    owner = MessageBus(unique("scales"), bus_url)
    owner.include(WeighParcelHandler)
    caller = MessageBus(unique("depot"), bus_url)
    async with owner, caller:
        [consumer] = owner._in._command_engines
        assert isinstance(consumer._deadlines, Deadlines)
        assert consumer._deadlines.limit == 0.3
        with pytest.raises(RemoteHandlerError) as info:
            await caller.send(WeighParcel(parcel_id="heavy", slow=5.0), timeout=10)
        # The consumer keeps serving: the next command is answered.
        assert await caller.send(WeighParcel(parcel_id="light"), timeout=10) == 5
    assert info.value.error_type == "TimeoutError"
    # Deadlines' message (asyncio.timeout's TimeoutError has none), naming the handler.
    assert "ran past its timeout of 0.3 s" in info.value.error_message
    assert "WeighParcelHandler" in info.value.error_message
    assert WeighParcelHandler.cancelled == ["heavy"]
    # The failure is logged inside the message's log context.
    [failed] = [line for line in captured if line.get("event") == "request_failed"]
    assert failed["handler"] == WeighParcelHandler.contexts[0].handler
    assert failed["attempt"] == 1
    assert failed["version"] == 1
    assert failed["event_id"] == WeighParcelHandler.contexts[0].id
    assert str(failed["error"]).startswith("TimeoutError: ")


async def test_command_handler_log_lines_carry_the_message_context(
    bus_url: str, unique, captured: list[dict[str, object]]
) -> None:
    WeighParcelHandler.contexts = []
    owner = MessageBus(unique("scales"), bus_url)
    owner.include(WeighParcelHandler)
    caller = MessageBus(unique("depot"), bus_url)
    async with owner, caller:
        assert await caller.send(WeighParcel(parcel_id="p-1"), timeout=10) == 3
    [ctx] = WeighParcelHandler.contexts
    [line] = [line for line in captured if line.get("event") == "weighing"]
    for field in (
        "event_id",
        "message_type",
        "version",
        "correlation_id",
        "causation_id",
        "trace_id",
        "span_id",
        "service",
        "group",
        "handler",
        "attempt",
    ):
        assert field in line, f"{field} missing from {line}"
    assert line["event_id"] == ctx.id
    assert line["message_type"] == "WeighParcel"
    assert line["version"] == 1
    assert line["attempt"] == 1
    assert line["correlation_id"] == ctx.correlation_id
    assert line["service"] == owner.service
    assert str(line["handler"]).endswith("WeighParcelHandler")
