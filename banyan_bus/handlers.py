"""Handlers as the consumer engine sees them: a name and a way to run one message.

A function handler is ``async def h(event)`` or ``async def h(event, ctx)``;
its signature is inspected once, at subscribe time, so a wrong one fails
there rather than at the first message.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypeVar, get_type_hints

from banyan_bus.context import MessageContext
from banyan_bus.contracts import Message, registry
from banyan_bus.errors import HandlerError
from banyan_bus.subscription import REQUEST_OPTIONS, SubscriptionOptions
from banyan_bus.versions import Upcast, upcast_chain

T = TypeVar("T")

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
    """A name stable across restarts and instances (it marks handlers done on retries)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def function_handler(contract: type[Message], fn: Callable[..., Awaitable[Any]]) -> HandlerSpec:
    """Wrap ``async def fn(event)`` or ``async def fn(event, ctx)`` for the engine."""
    if not callable(fn):
        raise HandlerError(f"handler for {contract.__name__} must be callable, got {fn!r}")
    target: Any = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
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
    required = [p for p in params if p.default is p.empty]
    if not params or len(required) > 2:
        raise HandlerError(
            f"handler {name} for {contract.__name__} takes {len(required)} positional "
            f"parameters without a default; it must take (event) or (event, ctx)."
        )
    if len(params) >= 2 and _wants_context(params[1]):
        invoke: Invoke = fn
    else:

        async def invoke_event(message: Message, ctx: MessageContext) -> Any:
            return await fn(message)

        invoke = invoke_event
    return HandlerSpec(
        name=name,
        contract=contract,
        invoke=invoke,
        versions=frozenset({contract.__message_version__}),
    )


def _wants_context(param: inspect.Parameter) -> bool:
    """Whether the second positional parameter is the ``MessageContext``.

    One without a default is (``async def h(event, ctx)``). One with a default is
    only if it says so by its annotation (``ctx: MessageContext | None = None``):
    ``async def h(event, retries=3)`` keeps its 3 rather than receive a context.
    """
    if param.default is param.empty:
        return True
    # A string under `from __future__ import annotations`, else the object (its repr names
    # the class for `MessageContext`, `MessageContext | None`, `Optional[MessageContext]`).
    annotation = param.annotation
    return "MessageContext" in (annotation if isinstance(annotation, str) else repr(annotation))


# -- class handlers -------------------------------------------------------------------

HandlerKind = Literal["event", "command", "query"]
_HANDLE_V = re.compile(r"^handle_v(\d+)$")
_MARK = "__banyan_handler__"  # the attribute the class decorators set


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """What a class decorator recorded: the contract and the subscription options.

    Commands and queries take only ``concurrency`` and ``timeout`` of the options.
    """

    kind: HandlerKind
    contract: type[Message]
    options: SubscriptionOptions


def _decorate(
    kind: HandlerKind, contract: type[Message], options: dict[str, Any]
) -> Callable[[type[T]], type[T]]:
    expected = {"event": "Event", "command": "Command", "query": "Query"}[kind]
    if not (isinstance(contract, type) and issubclass(contract, Message)) or (
        contract.is_abstract_contract() or contract.__message_kind__ != kind
    ):
        raise HandlerError(
            f"@{expected}Handler takes a concrete {expected} class, got {contract!r}"
        )

    def mark(cls: type[T]) -> type[T]:
        if not isinstance(cls, type):
            raise HandlerError(f"@{expected}Handler decorates a class, got {cls!r}")
        if not inspect.iscoroutinefunction(getattr(cls, "handle", None)) and not any(
            _HANDLE_V.match(n) for n in dir(cls)
        ):
            raise HandlerError(
                f"{cls.__qualname__} needs `async def handle(self, message)` "
                f"(or handle_v1, handle_v2, … methods) to handle {contract.__name__}"
            )
        allowed = None if kind == "event" else REQUEST_OPTIONS
        checked = SubscriptionOptions.from_options(options, allowed=allowed, owner=cls.__qualname__)
        setattr(cls, _MARK, HandlerOptions(kind, contract, checked))
        _check_methods(cls, contract)
        return cls

    return mark


def EventHandler(contract: type[Message], **options: Any) -> Callable[[type[T]], type[T]]:
    """Mark a class as an event handler; options are ``bus.subscribe``'s.

    Example::

        @EventHandler(UserCreated, subscription_group="welcome-emails", concurrency=5)
        class SendWelcomeEmail:
            def __init__(self, email: EmailService) -> None:
                self.email = email

            async def handle(self, event: UserCreated) -> None:
                await self.email.send(event.email, "welcome")

    Constructor parameters are injected by type (see ``MessageBus(providers=...)``);
    a new instance is built for every message, in a per-message scope.
    """
    return _decorate("event", contract, options)


def CommandHandler(contract: type[Message], **options: Any) -> Callable[[type[T]], type[T]]:
    """Mark a class as the owner of a command; ``handle`` returns the result.

    Options: ``concurrency`` (default 10) and ``timeout`` (default the bus's).
    """
    return _decorate("command", contract, options)


def QueryHandler(contract: type[Message], **options: Any) -> Callable[[type[T]], type[T]]:
    """Mark a class as the owner of a query; ``handle`` returns the answer (options as
    ``CommandHandler``'s)."""
    return _decorate("query", contract, options)


def handler_options(cls: type[Any]) -> HandlerOptions | None:
    opts = getattr(cls, _MARK, None)
    return opts if isinstance(opts, HandlerOptions) else None


def _message_param(method: Callable[..., Any]) -> tuple[Any, int]:
    """The first parameter's annotation after ``self``, and how many positional params."""
    try:
        hints = get_type_hints(method)
    except Exception:  # unresolved forward refs: nothing to check against
        hints = {}
    params = [
        p
        for p in inspect.signature(method).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][1:]
    if not params:
        return None, 0
    return hints.get(params[0].name), len(params)


def _check_methods(cls: type[Any], contract: type[Message]) -> None:
    for name in dir(cls):
        match = _HANDLE_V.match(name)
        if name != "handle" and not match:
            continue
        method = getattr(cls, name)
        if not inspect.iscoroutinefunction(method):
            raise HandlerError(f"{cls.__qualname__}.{name} must be `async def`")
        annotation, count = _message_param(method)
        if count not in (1, 2):
            raise HandlerError(
                f"{cls.__qualname__}.{name} must take (self, message) or (self, message, ctx)"
            )
        if match:
            expected = registry.get(contract.__message_type__, int(match[1]))
            if expected is None:
                raise HandlerError(
                    f"{cls.__qualname__}.{name}: no contract is registered for "
                    f"{contract.__message_type__} version {match[1]}"
                )
        else:
            expected = contract
        if annotation is not None and annotation is not expected:
            shown = getattr(annotation, "__name__", annotation)
            raise HandlerError(
                f"{cls.__qualname__}.{name} is annotated with {shown} "
                f"but handles {expected.__name__} ({expected.__message_type__} "
                f"v{expected.__message_version__}); make them agree."
            )


def _method_invoker(
    method_name: str, with_ctx: bool, chain: list[Upcast]
) -> Callable[[Any, Message, MessageContext], Awaitable[Any]]:
    async def call(instance: Any, message: Message, ctx: MessageContext) -> Any:
        for step in chain:
            message = step(message)
        method = getattr(instance, method_name)
        return await (method(message, ctx) if with_ctx else method(message))

    return call


def dispatch_table(
    cls: type[Any], contract: type[Message]
) -> dict[int, Callable[[Any, Message, MessageContext], Awaitable[Any]]]:
    """For each version this class serves: how to call it (method, upcasters).

    ``handle_vN`` serves version N; ``handle`` serves the decorator's version and
    every older version an upcaster chain leads to it from.
    """
    message_type = contract.__message_type__
    table: dict[int, Callable[[Any, Message, MessageContext], Awaitable[Any]]] = {}
    for version in registry.versions(message_type):
        method = f"handle_v{version}"
        if inspect.iscoroutinefunction(getattr(cls, method, None)):
            table[version] = _method_invoker(
                method, _message_param(getattr(cls, method))[1] == 2, []
            )
            continue
        handle = getattr(cls, "handle", None)
        if not inspect.iscoroutinefunction(handle):
            continue
        chain = upcast_chain(message_type, version, contract.__message_version__)
        if chain is not None:
            table[version] = _method_invoker("handle", _message_param(handle)[1] == 2, chain)
    return table


def handler_classes(items: Iterable[type[Any] | ModuleType]) -> list[type[Any]]:
    """The handler classes ``bus.include`` registers: classes as given, and for a module
    every decorated class defined in it, in definition order.

    Raises ``HandlerError`` for a class that is not decorated.
    """
    found: list[type[Any]] = []
    for item in items:
        if isinstance(item, ModuleType):
            found += [
                obj
                for obj in vars(item).values()
                if isinstance(obj, type)
                and handler_options(obj) is not None
                and obj.__module__ == item.__name__
            ]
        elif handler_options(item) is None:
            raise HandlerError(
                f"{getattr(item, '__qualname__', item)!r} is not a handler class: decorate it "
                f"with @EventHandler(...), @CommandHandler(...) or @QueryHandler(...)"
            )
        else:
            found.append(item)
    return found
