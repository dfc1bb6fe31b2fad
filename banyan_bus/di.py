"""Dependency injection for class handlers, on dishka.

The user gives dishka ``Provider``s; the bus adds its own (``MessageContext``,
the ``MessageBus``, a bound structlog logger) and one factory per handler
class, then builds the container once at ``bus.start()``. dishka checks the
whole graph then, so a handler whose constructor asks for something nobody
provides fails at start, naming the handler and the parameter, never at the
first message.

Each message is handled in its own ``Scope.REQUEST``: a per-message
dependency (a DB session, a unit of work) is created for that message and
finalized when it is done, also when the handler raised.

Example::

    class Services(Provider):
        email = provide(ConsoleEmailService, provides=EmailService, scope=Scope.APP)

        @provide(scope=Scope.REQUEST)
        async def session(self) -> AsyncIterator[Session]:
            async with Session() as s:
                yield s

    bus = MessageBus("email-service", providers=[Services()])
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, get_type_hints

import structlog
from dishka import AsyncContainer, Provider, Scope, make_async_container
from dishka.exceptions import NoFactoryError

from banyan_bus.context import MessageContext
from banyan_bus.contracts import Message
from banyan_bus.errors import DependencyError, HandlerError
from banyan_bus.handlers import HandlerOptions, HandlerSpec, dispatch_table, handler_options

#: The logger type handlers may ask for; it is bound to the message's fields.
Logger = structlog.typing.FilteringBoundLogger

_LOGGER_TYPES: tuple[Any, ...] = (
    structlog.typing.FilteringBoundLogger,
    structlog.stdlib.BoundLogger,
    structlog.BoundLogger,
)

MethodCall = Callable[[Any, Message, MessageContext], Awaitable[Any]]


def message_logger(ctx: MessageContext) -> Any:
    return structlog.get_logger("banyan_bus.handler").bind(
        event_id=ctx.id,
        message_type=ctx.message_type,
        correlation_id=ctx.correlation_id,
        handler=ctx.handler,
        group=ctx.group,
        attempt=ctx.attempt,
    )


class Injector:
    """Builds handler instances per message from the user's providers.

    ``app_context`` holds the objects the bus itself offers for injection at
    application scope, keyed by the type a handler asks for (the bus passes
    ``{MessageBus: bus}``). Taking them as data keeps this module below the bus
    in the import graph.
    """

    def __init__(self, providers: Sequence[Provider], app_context: Mapping[type, object]) -> None:
        self._providers = list(providers)
        self._app_context = dict(app_context)
        self._classes: list[type[Any]] = []
        self._container: AsyncContainer | None = None

    def add(self, cls: type[Any]) -> None:
        if cls not in self._classes:
            self._classes.append(cls)

    @property
    def needed(self) -> bool:
        return bool(self._classes)

    def build(self) -> None:
        """Build the container and validate every handler's constructor (at start)."""
        own = Provider(scope=Scope.REQUEST)
        own.from_context(provides=MessageContext, scope=Scope.REQUEST)
        for app_type in self._app_context:
            own.from_context(provides=app_type, scope=Scope.APP)
        for logger_type in _LOGGER_TYPES:
            own.provide(message_logger, provides=logger_type, scope=Scope.REQUEST)
        for cls in self._classes:
            own.provide(cls, scope=Scope.REQUEST)
        try:
            self._container = make_async_container(*self._providers, own, context=self._app_context)
        except NoFactoryError as exc:
            raise self._explain(exc) from exc

    def _explain(self, exc: NoFactoryError) -> DependencyError:
        missing = exc.requested.type_hint
        for cls in self._classes:
            try:
                hints = get_type_hints(cls.__init__)
            except Exception:
                hints = {}
            for name in inspect.signature(cls.__init__).parameters:
                if hints.get(name) is missing:
                    return DependencyError(
                        f"handler {cls.__qualname__} cannot be built: its parameter "
                        f"{name!r} needs {getattr(missing, '__qualname__', missing)}, which no "
                        f"provider gives. Add one to MessageBus(providers=[...]) "
                        f"(MessageContext, MessageBus and a structlog logger are built in)."
                    )
        return DependencyError(f"a handler dependency cannot be resolved: {exc}")

    def handler(self, cls: type[Any]) -> tuple[HandlerOptions, HandlerSpec]:
        """Take ``cls`` (a decorated handler class) into the container; its spec to run it.

        The spec builds an instance per message in its own scope and calls the
        method for the message's version (``handlers.dispatch_table``).
        """
        opts = handler_options(cls)
        if opts is None:
            raise HandlerError(f"{cls.__qualname__} is not a handler class")
        table = dispatch_table(cls, opts.contract)
        self.add(cls)
        spec = HandlerSpec(
            name=f"{cls.__module__}.{cls.__qualname__}",
            contract=opts.contract,
            invoke=self.invoker(cls, table),
            versions=frozenset(table),
        )
        return opts, spec

    def invoker(
        self, cls: type[Any], table: dict[int, MethodCall]
    ) -> Callable[[Message, MessageContext], Awaitable[Any]]:
        """The per-message call: open a scope, build ``cls``, run its method for the version."""

        async def invoke(message: Message, ctx: MessageContext) -> Any:
            container = self._container
            if container is None:
                raise RuntimeError("the bus is not started: handlers have no container yet")
            async with container(context={MessageContext: ctx}) as scope:
                instance = await scope.get(cls)
                # The version the message was read as (tolerant reading may read a
                # newer one on the wire as an older one): its contract says which.
                return await table[type(message).__message_version__](instance, message, ctx)

        return invoke

    async def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            await container.close()
