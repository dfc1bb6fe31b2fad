"""Commands and queries: request/response over the same broker.

Topology: ``exchange.platform.commands`` (direct) → one queue per command or
query type, ``exchange.platform.commands.{type}``, declared by the service that
owns it; its instances compete for requests. Requests carry ``reply_to``
(RabbitMQ's direct reply-to: no reply queue to declare) and an ``expiration``
equal to the caller's timeout, so a request nobody took in time is dropped by
the broker instead of being executed after the caller gave up.

A reply body is ``{"ok": true, "result": …}`` or
``{"ok": false, "error": {"type": …, "message": …}}``. The caller turns the
result into the contract's ``result=`` type, or raises ``RemoteHandlerError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pydantic_core
import structlog
from opentelemetry.trace import SpanKind
from pydantic import TypeAdapter

from banyan_bus.context import MessageContext
from banyan_bus.contracts import ContractRegistry, routing_key_for
from banyan_bus.deadlines import DeadlineExceeded
from banyan_bus.delivery import DeliveryConsumer, timeout_error
from banyan_bus.envelope import DecodeError, Envelope, decode
from banyan_bus.errors import BanyanError, RemoteHandlerError, RequestTimeout, Unroutable
from banyan_bus.handlers import HandlerSpec
from banyan_bus.logcontext import bind_handler_log_context
from banyan_bus.telemetry import Telemetry, fail
from banyan_bus.topology import (
    COMMANDS_EXCHANGE,
    BindingDecl,
    Declaration,
    ExchangeDecl,
    QueueDecl,
    apply,
    command_queue,
)
from banyan_bus.transport.base import DEFAULT_EXCHANGE, Delivery, OutgoingMessage, Transport

log = structlog.get_logger("banyan_bus.rpc")

_adapters: dict[Any, TypeAdapter[Any]] = {}


def _adapter(result_type: Any) -> TypeAdapter[Any]:
    adapter = _adapters.get(result_type)
    if adapter is None:
        adapter = _adapters[result_type] = TypeAdapter(result_type)
    return adapter


def command_plan(message_type: str) -> list[Declaration]:
    """The commands exchange and the queue of one command type, bound by its routing key."""
    queue = command_queue(message_type)
    return [
        ExchangeDecl(COMMANDS_EXCHANGE, "direct"),
        QueueDecl(queue, {"x-queue-type": "quorum"}),
        BindingDecl(COMMANDS_EXCHANGE, queue, "queue", routing_key_for(message_type)),
    ]


class Requester:
    """The caller's side: one reply address per connection, a future per request."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._pending: dict[str, asyncio.Future[Delivery]] = {}
        self._reply_to: str | None = None
        self._lock = asyncio.Lock()

    async def _address(self) -> str:
        if self._reply_to is None:
            async with self._lock:
                if self._reply_to is None:
                    self._reply_to = await self._transport.start_replies(self._on_reply)
        return self._reply_to

    def _on_reply(self, delivery: Delivery) -> None:
        future = self._pending.pop(delivery.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(delivery)

    async def request(self, message: OutgoingMessage, *, timeout: float, result_type: Any) -> Any:
        message_type = message.message_type or "?"
        message.reply_to = await self._address()
        message.expiration = max(1, int(timeout * 1000))
        key = message.message_id or ""
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            try:
                await self._transport.publish(
                    COMMANDS_EXCHANGE,
                    routing_key_for(message_type),
                    message,
                    confirm=True,
                    mandatory=True,
                )
            except Unroutable as exc:
                raise RequestTimeout(
                    f"no service handles {message_type}: no queue is bound for it on "
                    f"{COMMANDS_EXCHANGE!r} (is the owning service deployed?)"
                ) from exc
            try:
                async with asyncio.timeout(timeout):
                    reply = await future
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"{message_type} {key} got no answer within {timeout} s; the owning "
                    f"service may be down or slow (the request expires unhandled)"
                ) from exc
        finally:
            self._pending.pop(key, None)
        return _read_reply(reply, message_type, result_type)


def _read_reply(reply: Delivery, message_type: str, result_type: Any) -> Any:
    data = json.loads(reply.body)
    if not data.get("ok"):
        error = data.get("error") or {}
        raise RemoteHandlerError(
            message_type, str(error.get("type", "Error")), str(error.get("message", ""))
        )
    result = data.get("result")
    if result_type is None:
        return result
    return _adapter(result_type).validate_python(result)


class CommandConsumer(DeliveryConsumer):
    """The owner's side: consume the command queue, run the handler, reply.

    A request runs through the same delivery frame as an event
    (:class:`~banyan_bus.delivery.DeliveryConsumer`): its context, a SERVER span,
    the log fields, the handler's deadline and safe settling. What differs is
    the end: a request is never retried or dead-lettered - the caller is waiting
    - so every outcome, failure or refusal, is a reply, and the request is acked.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        registry: ContractRegistry,
        message_type: str,
        handler: HandlerSpec,
        service: str,
        concurrency: int,
        timeout: float | None,
        telemetry: Telemetry,
        context_factory: Callable[[Envelope, Delivery], MessageContext] | None = None,
    ) -> None:
        super().__init__(
            transport=transport,
            telemetry=telemetry,
            service=service,
            group=service,
            message_type=message_type,
            concurrency=concurrency,
            timeout=timeout,
            auto_ack=True,
            destination=COMMANDS_EXCHANGE,
            span_kind=SpanKind.SERVER,
            log=log.bind(message_type=message_type),
        )
        self._registry = registry
        self.message_type = message_type
        self._handler = handler
        self._concurrency = concurrency
        self._context_factory = context_factory

    async def start(self) -> None:
        await apply(self._transport, command_plan(self.message_type))
        queue = command_queue(self.message_type)
        self._consumers.append(
            await self._transport.consume(queue, self._on_delivery, prefetch=self._concurrency * 2)
        )

    def _context(self, envelope: Envelope, delivery: Delivery) -> MessageContext:
        if self._context_factory is None:
            return super()._context(envelope, delivery)
        return self._context_factory(envelope, delivery)

    def _admit(self, delivery: Delivery) -> Envelope | DecodeError:
        try:
            envelope = decode(delivery, self._registry)
        except DecodeError as exc:
            return exc
        if not self._handler.serves(envelope.version):
            return DecodeError(
                "unknown-version",
                f"{envelope.message_type} version {envelope.version} has no handler here",
            )
        return envelope

    async def _refuse(self, delivery: Delivery, error: DecodeError) -> None:
        await self._reply(
            delivery, {"ok": False, "error": {"type": "BadRequest", "message": str(error)}}
        )
        await self._safe(delivery.ack(), delivery)

    async def _run(self, delivery: Delivery, envelope: Envelope, ctx: MessageContext) -> None:
        handler = self._handler
        ctx.handler = handler.name
        bind_handler_log_context(handler.name, ctx.attempt)
        deadlines = self._deadlines
        try:
            if deadlines is None:
                result = await handler.invoke(envelope.payload, ctx)
            else:
                result = await deadlines.bounded(
                    handler.invoke(envelope.payload, ctx), handler.name
                )
        except Exception as exc:
            error = timeout_error(exc) if isinstance(exc, DeadlineExceeded) else exc
            fail(ctx.span, error)
            self._log.warning(
                "request_failed",
                message_id=envelope.id,
                error=f"{type(error).__qualname__}: {error}",
            )
            body: dict[str, Any] = {
                "ok": False,
                "error": {"type": type(error).__qualname__, "message": str(error)},
            }
        else:
            body = {"ok": True, "result": result}
        await self._reply(delivery, body)
        await self._safe(delivery.ack(), delivery)

    async def _reply(self, delivery: Delivery, body: dict[str, Any]) -> None:
        if not delivery.reply_to:
            return  # fire-and-forget command: nobody waits for an answer
        try:
            payload = pydantic_core.to_json(body, by_alias=True)
        except pydantic_core.PydanticSerializationError as exc:
            payload = json.dumps(
                {"ok": False, "error": {"type": "SerializationError", "message": str(exc)}}
            ).encode()
        try:
            await self._transport.publish(
                DEFAULT_EXCHANGE,
                delivery.reply_to,
                OutgoingMessage(
                    body=payload,
                    correlation_id=delivery.message_id,
                    message_type=f"{self.message_type}.reply",
                    persistent=False,
                ),
                confirm=False,
            )
        except BanyanError as exc:  # the caller went away: its request times out
            self._log.warning("reply_failed", message_id=delivery.message_id, error=str(exc))
