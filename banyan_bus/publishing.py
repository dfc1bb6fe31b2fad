"""The way out: from ``bus.publish`` / ``bus.send`` to a message on the broker.

One pipeline per started bus, built on its connection: which contract a call
means (an instance, a class with data, a message type's name, a pinned
version), where the message goes (the root exchange, or the delay levels for
``after=``), the envelope and its AMQP properties (``envelope.encode``), the
PRODUCER span and the trace context the envelope always carries, the publish
middleware, and the transport's confirmed publish. ``MessageBus`` keeps the
public signatures and their documentation; this module keeps the steps, so the
bus reads as the service's lifecycle and the publish path reads in one place.

Inside a handler a publish inherits the handled message's correlation id and
names it as its cause, with no code from the user: the current
``MessageContext`` is read here, once per publish.
"""

from __future__ import annotations

import difflib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, overload

from opentelemetry.trace import SpanKind

from banyan_bus.after import parse_after
from banyan_bus.context import current_context
from banyan_bus.contracts import Command, ContractRegistry, Event, Message, Query, routing_key_for
from banyan_bus.delay import delay_route
from banyan_bus.envelope import HEADER_DELAY, HEADER_PARTITION_KEY, Priority, encode
from banyan_bus.errors import ConfigurationError, ContractError
from banyan_bus.middleware import MessageCall, Middleware, compose
from banyan_bus.rpc import Requester
from banyan_bus.telemetry import (
    BODY_SIZE,
    CONVERSATION_ID,
    MESSAGE_ID,
    MESSAGE_TYPE,
    Telemetry,
    fail,
)
from banyan_bus.topology import COMMANDS_EXCHANGE, ROOT_EXCHANGE, delayed_publish_destination
from banyan_bus.transport.base import Headers, Transport
from banyan_bus.versions import read_as


def resolve_event(
    message: Message | type[Message] | str,
    data: dict[str, Any] | None,
    contracts: ContractRegistry,
    pinned: Mapping[str, type[Message]],
) -> Event:
    """The event a ``publish(message, data)`` call means, in the version it must go out as.

    ``message`` is an instance, a contract class with ``data``, or a registered
    message type's name with ``data``. A version pinned by ``publish_versions``
    wins: another version of the type is read as the pinned one (a downcaster,
    an upcaster, or re-validation), or refused with both versions named.
    """
    if isinstance(message, str):
        message = contract_named(message, contracts, pinned)
    if isinstance(message, type) and issubclass(message, Message):
        if data is None:
            raise ContractError(
                f"publish({message.__name__}) needs the event's data: "
                f"publish({message.__name__}, {{...}}) or publish({message.__name__}(...))"
            )
        event: Message = message.model_validate(data)
    elif isinstance(message, Message):
        if data is not None:
            raise ContractError(
                "publish(instance, data): give an instance or a class with data, not both"
            )
        event = message
    else:
        raise ContractError(
            f"publish() takes an Event instance or an Event class and a dict, got {message!r}"
        )
    if not isinstance(event, Event):
        raise ContractError(
            f"{type(event).__name__} is a {type(event).__message_kind__}; publish() is for "
            f"events. Use bus.send() for commands and bus.query() for queries."
        )
    if event.is_abstract_contract():
        raise ContractError(f"{type(event).__name__} is an abstract contract")
    pin = pinned.get(type(event).__message_type__)
    if pin is not None and type(event) is not pin:
        try:
            event = read_as(event, pin)
        except ContractError as exc:
            raise ContractError(
                f"publish_versions pins {pin.__message_type__} to "
                f"v{pin.__message_version__}, and {exc}"
            ) from exc
    assert isinstance(event, Event)  # read_as keeps the kind of the type
    return event


def contract_named(
    message_type: str, contracts: ContractRegistry, pinned: Mapping[str, type[Message]]
) -> type[Message]:
    """The contract ``publish("OrderPlaced", {...})`` means: pinned, else the oldest.

    The oldest and not the latest: a name carries no version, and every
    subscriber that serves the type serves its oldest version, so that is the one
    a rolling deploy cannot break (pin a newer one with ``publish_versions``).
    """
    pin = pinned.get(message_type)
    if pin is not None:
        return pin
    versions = contracts.versions(message_type)
    if not versions:
        known = sorted({c.__message_type__ for c in contracts if issubclass(c, Event)})
        close = difflib.get_close_matches(message_type, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ContractError(
            f"publish({message_type!r}, ...): no event contract of that message type is "
            f"registered in this process (import the module that defines it).{hint}"
        )
    return versions[min(versions)]


class Publisher:
    """The publish and request pipeline of one started bus (one connection)."""

    def __init__(
        self,
        *,
        service: str,
        transport: Transport,
        telemetry: Telemetry,
        requester: Requester,
        max_message_size: int,
        middleware: Sequence[Middleware],
        ensure_delays: Callable[[], Awaitable[None]],
    ) -> None:
        self._service = service
        self._transport = transport
        self._telemetry = telemetry
        self._requester = requester
        self._max_size = max_message_size
        self._ensure_delays = ensure_delays
        # Composed once; None keeps the path without middleware free of any call.
        self._chain = compose(middleware, self._send) if middleware else None

    async def publish(
        self,
        event: Event,
        *,
        priority: Priority,
        wait_for_confirmation: bool,
        correlation_id: str | None,
        headers: Headers | None,
        after: Any,
        partition_key: str | None,
        message_id: str | None,
        causation_id: str | None,
    ) -> str:
        ctx = current_context()
        if ctx is not None:
            causation_id = causation_id or ctx.id
            if correlation_id is None:
                correlation_id = ctx.correlation_id
        delay_ms = parse_after(after) if after is not None else None
        extra: Headers = dict(headers) if headers else {}
        key = partition_key
        if key is None and type(event).__partition_key__ is not None:
            key = str(getattr(event, type(event).__partition_key__ or ""))
        if key is not None:
            extra[HEADER_PARTITION_KEY] = key
        if delay_ms is not None:
            extra[HEADER_DELAY] = delay_ms
        message_type = type(event).__message_type__
        if delay_ms is None:
            exchange, routing_key = ROOT_EXCHANGE, routing_key_for(message_type)
        else:
            await self._ensure_delays()
            route = delay_route(delay_ms, delayed_publish_destination(message_type))
            exchange, routing_key = route.exchange, route.routing_key
        telemetry = self._telemetry
        with telemetry.publish_span(
            message_type=message_type, exchange=exchange, routing_key=routing_key, headers=extra
        ) as span:
            outgoing = encode(
                event,
                message_id=message_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                service_name=self._service,
                priority=priority,
                headers=extra,
                trace_context=Telemetry.trace_context(span, extra, ctx),
                max_size=self._max_size,
            )
            if span is not None:
                span.set_attribute(MESSAGE_ID, outgoing.message_id or "")
                span.set_attribute(CONVERSATION_ID, outgoing.correlation_id or "")
                span.set_attribute(BODY_SIZE, len(outgoing.body))
            try:
                if self._chain is None:
                    await self._transport.publish(
                        exchange, routing_key, outgoing, confirm=wait_for_confirmation
                    )
                else:
                    call = MessageCall(
                        "publish",
                        message_type,
                        event,
                        outgoing.headers,
                        context=ctx,
                        outgoing=outgoing,
                        exchange=exchange,
                        routing_key=routing_key,
                        confirm=wait_for_confirmation,
                    )
                    await self._chain(call)
            except Exception as exc:
                fail(span, exc)
                raise
        if telemetry.enabled:
            telemetry.published.add(1, {MESSAGE_TYPE: message_type})
        return outgoing.message_id or ""

    async def _send(self, call: MessageCall) -> None:
        """The publish middleware chain's last step: hand the message to the transport."""
        assert call.outgoing is not None  # a publish call always carries it
        await self._transport.publish(
            call.exchange, call.routing_key, call.outgoing, confirm=call.confirm
        )

    async def request(self, message: Message, timeout: float, result_type: Any) -> Any:
        """Send a command or query to its owner and wait for the answer (``rpc.Requester``)."""
        ctx = current_context()
        message_type = type(message).__message_type__
        headers: Headers = {}
        with self._telemetry.publish_span(
            message_type=message_type,
            exchange=COMMANDS_EXCHANGE,
            routing_key=routing_key_for(message_type),
            headers=headers,
            kind=SpanKind.CLIENT,
            operation="send",
        ) as span:
            outgoing = encode(
                message,
                service_name=self._service,
                correlation_id=ctx.correlation_id if ctx else None,
                causation_id=ctx.id if ctx else None,
                headers=headers,
                trace_context=Telemetry.trace_context(span, headers, ctx),
                max_size=self._max_size,
            )
            try:
                return await self._requester.request(
                    outgoing,
                    timeout=timeout,
                    result_type=result_type or type(message).__result_type__,
                )
            except Exception as exc:
                fail(span, exc)
                raise


class PublishApi:
    """The outbound half of ``MessageBus``'s API: ``publish``, ``send`` and ``query``.

    Kept beside the pipeline it fronts, so the bus module holds the service's
    lifecycle and its inbound API; a ``MessageBus`` is the only class that mixes
    it in, and gives it the attributes declared here.
    """

    contracts: ContractRegistry
    pinned_contracts: dict[str, type[Message]]
    _publisher: Publisher | None

    # -- commands and queries --------------------------------------------------------

    async def send(
        self, command: Command, *, timeout: float = 30.0, result_type: Any = None
    ) -> Any:
        """Send a command to the one service that owns it; returns its result.

        The result is turned into the command's ``result=`` type (or
        ``result_type``). Raises ``RemoteHandlerError`` if the handler raised,
        ``RequestTimeout`` if no answer came within ``timeout`` seconds.
        """
        if not isinstance(command, Command):
            raise ContractError(f"send() takes a Command instance, got {command!r}")
        return await self._request(command, timeout, result_type)

    async def query(self, query: Query, *, timeout: float = 30.0, result_type: Any = None) -> Any:
        """Ask the service that owns ``query``; returns its answer (see ``send``)."""
        if not isinstance(query, Query):
            raise ContractError(f"query() takes a Query instance, got {query!r}")
        return await self._request(query, timeout, result_type)

    async def _request(self, message: Message, timeout: float, result_type: Any) -> Any:
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout}")
        return await self._started_publisher().request(message, timeout, result_type)

    # -- publish --------------------------------------------------------------------

    @overload
    async def publish(
        self,
        message: Message,
        data: None = None,
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str: ...

    @overload
    async def publish(
        self,
        message: type[Message] | str,
        data: dict[str, Any],
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str: ...

    async def publish(
        self,
        message: Message | type[Message] | str,
        data: dict[str, Any] | None = None,
        *,
        priority: Priority = "normal",
        wait_for_confirmation: bool = True,
        correlation_id: str | None = None,
        headers: Headers | None = None,
        after: int | float | str | Any | None = None,
        partition_key: str | None = None,
        message_id: str | None = None,
        causation_id: str | None = None,
    ) -> str:
        """Publish an event to every subscribed group; returns its message id.

        ``message`` is a contract instance, or a contract class with ``data``
        (a dict validated into it: pydantic's ``ValidationError`` if it does not
        fit, nothing sent), or a registered message type's name with ``data``
        (``publish("OrderPlaced", {...})``, as platform code writes it: the version
        ``publish_versions`` pins, else the oldest registered). With
        ``wait_for_confirmation`` (the default) this returns once the broker has
        stored the event on every bound queue.
        ``after`` delays delivery ("10 seconds", 1500 ms, an ISO time; at most a
        year). Publishing to a type nobody subscribes to is not an error.
        ``message_id`` reuses an id (a re-sent event keeps its identity, so
        idempotent handlers run once); by default a new one is made. Inside a
        handler, correlation and causation ids are taken from the message being
        handled unless given (an outbox relay gives the stored ones).
        """
        event = resolve_event(message, data, self.contracts, self.pinned_contracts)
        return await self._started_publisher().publish(
            event,
            priority=priority,
            wait_for_confirmation=wait_for_confirmation,
            correlation_id=correlation_id,
            headers=headers,
            after=after,
            partition_key=partition_key,
            message_id=message_id,
            causation_id=causation_id,
        )

    def _started_publisher(self) -> Publisher:
        if self._publisher is None:
            raise RuntimeError(
                f"{self!r} is not started: use `async with bus:` or `await bus.start()`"
            )
        return self._publisher
