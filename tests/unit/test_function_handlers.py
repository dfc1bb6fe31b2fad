"""Which function signatures a subscription takes, and what each parameter receives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from banyan_bus import Event, HandlerError, MessageContext
from banyan_bus.handlers import function_handler


class SignatureCrateWeighed(Event, version=1):
    grams: int


CTX: Any = object()  # stands for the MessageContext the engine passes


def test_event_alone_and_event_with_context() -> None:
    received: list[Any] = []

    async def only_event(event: SignatureCrateWeighed) -> None:
        received.append(event.grams)

    async def with_context(event: SignatureCrateWeighed, ctx: MessageContext) -> None:
        received.append(ctx)

    asyncio.run(
        function_handler(SignatureCrateWeighed, only_event).invoke(
            SignatureCrateWeighed(grams=5), CTX
        )
    )
    asyncio.run(
        function_handler(SignatureCrateWeighed, with_context).invoke(
            SignatureCrateWeighed(grams=5), CTX
        )
    )
    assert received == [5, CTX]


def test_a_defaulted_second_parameter_keeps_its_default_unless_it_is_the_context() -> None:
    received: list[Any] = []

    async def with_option(event: SignatureCrateWeighed, retries: int = 3) -> None:
        received.append(retries)

    async def optional_context(
        event: SignatureCrateWeighed, ctx: MessageContext | None = None
    ) -> None:
        received.append(ctx)

    async def unannotated(event, limit=7):  # type: ignore[no-untyped-def]
        received.append(limit)

    for fn in (with_option, optional_context, unannotated):
        asyncio.run(
            function_handler(SignatureCrateWeighed, fn).invoke(SignatureCrateWeighed(grams=5), CTX)
        )
    assert received == [3, CTX, 7]


def test_more_than_two_required_parameters_is_refused_at_subscribe_time() -> None:
    async def three(event: SignatureCrateWeighed, ctx: MessageContext, extra: int) -> None:
        return None

    async def none() -> None:
        return None

    with pytest.raises(HandlerError, match=r"takes 3 positional parameters without a default"):
        function_handler(SignatureCrateWeighed, three)
    with pytest.raises(HandlerError, match=r"it must take \(event\) or \(event, ctx\)"):
        function_handler(SignatureCrateWeighed, none)
