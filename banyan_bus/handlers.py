"""Handlers as the consumer engine sees them: a name and a way to run one message.

A function handler is ``async def h(event)`` or ``async def h(event, ctx)``;
its signature is inspected once, at subscribe time, so a wrong one fails
there rather than at the first message.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from banyan_bus.context import MessageContext
from banyan_bus.contracts import Message
from banyan_bus.errors import HandlerError

Invoke = Callable[[Message, MessageContext], Awaitable[Any]]


@dataclass(slots=True)
class HandlerSpec:
    """One handler of one subscription.

    ``versions`` lists the contract versions it serves (the decoded payload is
    an instance of that version's contract); a message of any other version is
    not for this handler.
    """

    name: str
    contract: type[Message]
    invoke: Invoke
    versions: frozenset[int]

    def serves(self, version: int) -> bool:
        return version in self.versions


def _qualname(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def function_handler(contract: type[Message], fn: Callable[..., Awaitable[Any]]) -> HandlerSpec:
    """Wrap ``async def fn(event)`` or ``async def fn(event, ctx)`` for the engine."""
    if not callable(fn):
        raise HandlerError(f"handler for {contract.__name__} must be callable, got {fn!r}")
    target = fn.__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn
    if not inspect.iscoroutinefunction(target):
        raise HandlerError(
            f"handler {_qualname(fn)} for {contract.__name__} must be an `async def` function "
            f"taking (event) or (event, ctx)."
        )
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError) as exc:
        raise HandlerError(f"cannot inspect handler {fn!r}: {exc}") from exc
    name = _qualname(fn)
    if len(params) == 1:

        async def invoke_event(message: Message, ctx: MessageContext) -> Any:
            return await fn(message)

        invoke: Invoke = invoke_event
    elif len(params) == 2:
        invoke = fn
    else:
        raise HandlerError(
            f"handler {name} for {contract.__name__} takes {len(params)} positional "
            f"parameters; it must take (event) or (event, ctx)."
        )
    return HandlerSpec(
        name=name,
        contract=contract,
        invoke=invoke,
        versions=frozenset({contract.__message_version__}),
    )
