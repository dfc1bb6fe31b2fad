"""Middleware: code that runs around every publish and every handler, one interface for both.

A middleware is an async callable taking the :class:`MessageCall` and the next step::

    async def tenant_header(call: MessageCall, call_next: Next) -> object:
        if call.direction == "publish":
            call.headers["x-tenant"] = current_tenant()        # travels with the event
        elif call.headers.get("x-tenant") not in ALLOWED:
            raise PermissionError("unknown tenant")            # retried, then dead-lettered
        return await call_next(call)

    bus = MessageBus("billing", middleware=[tenant_header])
    await bus.subscribe(InvoicePaid, book, middleware=[timing])

What it may do: read and add headers; look at the message (and, on publish, the
encoded :class:`~banyan_bus.transport.base.OutgoingMessage`, whose body it may
replace, e.g. to encrypt it); short-circuit by returning without calling
``call_next`` (on publish nothing is sent; on consume the handler does not run
and the message counts as handled); or raise. A raise on publish reaches the
publisher; on consume it is the handler's failure: the subscription's
``RetryPolicy`` retries it and, when exhausted, it goes to the DLQ with the
middleware's exception, exactly as if the handler had raised.

**Order.** The bus's middleware is outermost, in list order, then the
subscription's (``subscribe(..., middleware=[...])``, ``@bus.handler``,
``@EventHandler``, ``@CommandHandler``), then the handler. On publish only the
bus's runs: ``[a, b]`` runs ``a`` → ``b`` → send → ``b`` returns → ``a`` returns.

**Where it runs.** On publish: inside the PRODUCER span, after the envelope is
encoded (``call.headers`` is the outgoing message's headers, trace context
included), before the transport sends it. On consume: around each handler run
(each attempt, and each handler of a group that has several), inside the
CONSUMER span, the handler's time limit, its log context (every log line
carries event id, type, correlation and trace ids, handler and attempt) and
its metrics (``banyan.handler.duration`` includes the middleware). Headers
added on consume are seen by later middleware and the handler
(``ctx.headers``) and travel with the message if it is retried.

**Cost.** The chain is composed once, when the handler is registered (and
once per bus for publish): with no middleware the handler is the very function
it was, and publish pays one ``is None`` test, no call and no allocation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, TypeAlias

from banyan_bus.context import MessageContext
from banyan_bus.contracts import Message
from banyan_bus.errors import ConfigurationError
from banyan_bus.transport.base import Headers, OutgoingMessage

if TYPE_CHECKING:
    from banyan_bus.handlers import HandlerSpec


@dataclass(slots=True)
class MessageCall:
    """What a middleware sees of one publish or one handler run.

    ``headers`` is the one mutable dict that travels: on publish the outgoing
    message's AMQP headers, on consume the delivery's (``context.headers``).
    """

    direction: Literal["publish", "consume"]
    message_type: str
    message: Message
    headers: Headers
    #: Consume: the handler's ``MessageContext`` (id, attempt, handler name, group ...).
    #: Publish: the context of the message being handled when publishing from a handler.
    context: MessageContext | None = None
    #: Publish only: the encoded message (body, ids, properties) about to be sent.
    outgoing: OutgoingMessage | None = None
    #: Publish only: where it goes, and whether the publisher waits for the broker's confirm.
    exchange: str = ""
    routing_key: str = ""
    confirm: bool = True


Next: TypeAlias = Callable[[MessageCall], Awaitable[object]]
#: ``async def middleware(call: MessageCall, call_next: Next) -> object``.
Middleware: TypeAlias = Callable[[MessageCall, Next], Awaitable[object]]


def check(middleware: Sequence[Middleware]) -> tuple[Middleware, ...]:
    """``middleware`` as a tuple; ``ConfigurationError`` for anything not callable."""
    if isinstance(middleware, str | bytes) or not isinstance(middleware, Sequence):
        raise ConfigurationError(
            f"middleware must be a list of async callables (call, call_next), got {middleware!r}"
        )
    for item in middleware:
        if not callable(item):
            raise ConfigurationError(
                f"middleware {item!r} is not callable; expected async def m(call, call_next)"
            )
    return tuple(middleware)


def compose(middleware: Sequence[Middleware], last: Next) -> Next:
    """One callable that runs ``middleware`` in order around ``last`` (built once, reused)."""
    step = last
    for outer in reversed(middleware):
        step = _link(outer, step)
    return step


def _link(middleware: Middleware, call_next: Next) -> Next:
    async def step(call: MessageCall) -> object:
        return await middleware(call, call_next)

    return step


def wrap_handler(spec: HandlerSpec, middleware: Sequence[Middleware]) -> HandlerSpec:
    """``spec`` with its ``invoke`` run through ``middleware``; ``spec`` itself when empty.

    The handler still gets the (possibly replaced) ``call.message`` and the context.
    """
    if not middleware:
        return spec
    invoke = spec.invoke

    async def run_handler(call: MessageCall) -> object:
        assert call.context is not None  # consume calls always carry one
        return await invoke(call.message, call.context)

    chain = compose(middleware, run_handler)

    async def invoke_through(message: Message, ctx: MessageContext) -> object:
        return await chain(
            MessageCall("consume", ctx.message_type, message, ctx.headers, context=ctx)
        )

    return replace(spec, invoke=invoke_through)
