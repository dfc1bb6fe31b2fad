"""A bus that lives and dies with a FastAPI (or any Starlette/ASGI) app.

``bus_lifespan(bus)`` is the app's lifespan: the bus starts before the app
takes its first request and stops gracefully after its last one (consumers
stop, in-flight handlers get the bus's grace period, the rest go back to
their queues). ``Bus`` is the dependency that hands an endpoint the running
bus, to publish, send or query::

    from fastapi import FastAPI
    from banyan_bus.fastapi import Bus, bus_lifespan

    bus = MessageBus("signup-api")
    app = FastAPI(lifespan=bus_lifespan(bus))

    @app.post("/users", status_code=202)
    async def sign_up(body: SignUp, bus: Bus) -> dict[str, str]:
        return {"eventId": await bus.publish(UserCreated(...))}

An endpoint called while the bus is not running (starting, or after a failed
start) gets ``503 Service Unavailable`` instead of a ``RuntimeError``. The app's
own lifespan, if it has one, goes inside: ``bus_lifespan(bus, inner=my_lifespan)``.

Needs FastAPI: ``pip install 'banyan-bus[fastapi]'``. Nothing here is imported by
``banyan_bus`` itself, so services without FastAPI never load it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar

from banyan_bus.bus import MessageBus

try:
    from fastapi import Depends, HTTPException, Request
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "banyan_bus.fastapi needs FastAPI: pip install 'banyan-bus[fastapi]' "
        "(or pip install 'fastapi>=0.110')"
    ) from exc

__all__ = ["STATE_KEY", "Bus", "bus_lifespan", "get_bus"]

#: Where the lifespan keeps the bus: ``app.state.banyan_bus``.
STATE_KEY = "banyan_bus"

App = TypeVar("App")


def bus_lifespan(
    bus: MessageBus,
    *,
    inner: Callable[[App], AbstractAsyncContextManager[Any]] | None = None,
    grace_period: float | None = None,
) -> Callable[[App], AbstractAsyncContextManager[None]]:
    """The app's lifespan: start ``bus``, run the app (and ``inner``), stop ``bus``.

    ``grace_period`` overrides the bus's for this stop. The bus is stored as
    ``app.state.banyan_bus`` for :func:`get_bus`.
    """

    @asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        state = getattr(app, "state", None)
        if state is not None:
            setattr(state, STATE_KEY, bus)
        await bus.start()
        try:
            if inner is None:
                yield
            else:
                async with inner(app):
                    yield
        finally:
            await bus.stop(grace_period=grace_period)

    return lifespan


def get_bus(request: Request) -> MessageBus:
    """The app's running bus (a FastAPI dependency; use the ``Bus`` annotation)."""
    bus = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(bus, MessageBus):
        raise RuntimeError(
            "this app has no message bus: create it with FastAPI(lifespan=bus_lifespan(bus))"
        )
    if not bus.started:
        raise HTTPException(status_code=503, detail="the message bus is not running")
    return bus


#: ``async def endpoint(bus: Bus)``: the running ``MessageBus`` of the app.
Bus = Annotated[MessageBus, Depends(get_bus)]
