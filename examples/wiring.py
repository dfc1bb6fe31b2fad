"""Wire handlers into a bus at import time, so a service module can expose a ready ``bus``.

``banyan run examples.signup.email_service:bus`` imports the module and starts
its ``bus``; the handlers must be registered by then, but ``MessageBus.register``
and ``MessageBus.subscribe`` are coroutines (on a *running* bus they declare
topology). On a bus that has not started they never suspend, so they can be
driven to completion here without an event loop. If one ever does suspend, this
fails loudly instead of leaving a half-registered bus.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from banyan_bus import Event, MessageBus


def _run_without_loop(step: Coroutine[Any, Any, Any], what: str) -> None:
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError(
        f"{what} needed the event loop (is the bus already started?); "
        f"wire handlers before bus.start(), or await it inside your own startup code"
    )


def with_handlers(bus: MessageBus, *handlers: type[Any]) -> MessageBus:
    """Register ``@EventHandler``/``@CommandHandler``/``@QueryHandler`` classes; return ``bus``."""
    if bus.started:
        raise RuntimeError(f"{bus!r} is started: register its handlers before starting it")
    _run_without_loop(bus.register(*handlers), "bus.register()")
    return bus


def with_subscription(
    bus: MessageBus,
    contract: type[Event],
    handler: Callable[..., Awaitable[Any]],
    **options: Any,
) -> MessageBus:
    """``bus.subscribe(contract, handler, **options)`` on a bus not started yet; returns ``bus``."""
    if bus.started:
        raise RuntimeError(f"{bus!r} is started: subscribe before starting it")
    _run_without_loop(bus.subscribe(contract, handler, **options), "bus.subscribe()")
    return bus
