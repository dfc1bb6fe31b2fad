"""The consumer engine: decode, run handlers, and settle every delivery exactly once.

Per delivery, in order:

1. decode the envelope; a message that cannot be decoded is dead-lettered at
   once (retrying cannot fix it);
2. run the group's handlers that serve the message's version, in definition
   order, each bounded by ``timeout`` and by the subscription's ``concurrency``;
3. on success ack; on failure ask the ``RetryPolicy``: run again now, send
   back through the delay levels to *this group's* exchange with ``x-attempt``
   + 1, or move to the DLQ with the failure's details. The original is acked
   only after that publish was confirmed; if it cannot be, the broker's own
   dead-lettering (``reject``) still puts it in the DLQ. Nothing is dropped.

Handlers that already succeeded for a message are named in the
``x-banyan-handled`` header of its retry, so a retry runs only the handler
that failed and those after it.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from banyan_bus.context import MessageContext, _current
from banyan_bus.contracts import ContractRegistry, Message
from banyan_bus.delay import delay_route
from banyan_bus.envelope import (
    HEADER_ATTEMPT,
    HEADER_DELAY,
    PRIORITY_LEVELS,
    DecodeError,
    Envelope,
    decode,
    format_timestamp,
)
from banyan_bus.errors import BanyanError
from banyan_bus.handlers import HandlerSpec
from banyan_bus.retry import RetryPolicy
from banyan_bus.topology import QueueOptions, dead_letter_queue, group_exchange
from banyan_bus.transport.base import (
    DEFAULT_EXCHANGE,
    Consumer,
    Delivery,
    Headers,
    HeaderValue,
    OutgoingMessage,
    Transport,
)

log = structlog.get_logger("banyan_bus.consume")

HEADER_HANDLED = "x-banyan-handled"
HEADER_FIRST_FAILURE = "x-banyan-first-failure"
# Dead-letter record headers (DESIGN.md §4).
DLQ_REASON = "x-banyan-reason"
DLQ_EXCEPTION_TYPE = "x-banyan-exception-type"
DLQ_EXCEPTION_MESSAGE = "x-banyan-exception-message"
DLQ_TRACEBACK = "x-banyan-traceback"
DLQ_HANDLER = "x-banyan-handler"
DLQ_GROUP = "x-banyan-group"
DLQ_LAST_FAILURE = "x-banyan-last-failure"
DLQ_ORIGINAL_EXCHANGE = "x-banyan-original-exchange"
DLQ_ORIGINAL_ROUTING_KEY = "x-banyan-original-routing-key"

_TRACEBACK_LIMIT = 4000
_NORMAL_PRIORITY = PRIORITY_LEVELS["normal"]


@dataclass(slots=True)
class Subscription:
    """One group's subscription to one message type: its queue and its handlers."""

    message_type: str
    group: str
    handlers: list[HandlerSpec]
    concurrency: int
    prefetch: int
    auto_ack: bool
    retry: RetryPolicy
    timeout: float | None
    queue: QueueOptions = field(default_factory=QueueOptions)

    @property
    def queue_name(self) -> str:
        return group_exchange(self.group, self.message_type)

    @property
    def dlq_name(self) -> str:
        return dead_letter_queue(self.group, self.message_type)


class _Failure(Exception):
    """A handler attempt failed; carries what the DLQ record needs."""

    def __init__(self, reason: str, handler: str, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.reason = reason
        self.handler = handler
        self.exc = exc


class SubscriptionConsumer:
    """Runs one subscription on one transport connection."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        transport: Transport,
        registry: ContractRegistry,
        ensure_delays: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.subscription = subscription
        self._transport = transport
        self._registry = registry
        self._ensure_delays = ensure_delays
        self._semaphore = asyncio.Semaphore(subscription.concurrency)
        self._consumer: Consumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned_priority = False
        self._log = log.bind(group=subscription.group, message_type=subscription.message_type)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._consumer = await self._transport.consume(
            self.subscription.queue_name, self._on_delivery, prefetch=self.subscription.prefetch
        )

    async def stop_consuming(self) -> None:
        """Stop taking new messages; in-flight handlers go on."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no delivery is being handled; False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            return False
        return True

    async def cancel_in_flight(self) -> None:
        """Cancel handlers still running at the end of the grace period.

        Their deliveries are returned to the queue (nack with requeue), so
        another instance handles them; nothing is lost.
        """
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # -- per delivery ---------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with self._semaphore:
                await self._handle(delivery)
        except asyncio.CancelledError:
            if not delivery.settled:
                await self._safe(delivery.nack(requeue=True), delivery)
            raise
        except Exception:  # a bug in the engine itself: never lose the message
            self._log.exception("consumer_error", message_id=delivery.message_id)
            if not delivery.settled:
                await self._safe(delivery.nack(requeue=True), delivery)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, delivery: Delivery) -> None:
        sub = self.subscription
        try:
            envelope = decode(delivery, self._registry)
        except DecodeError as exc:
            await self._dead_letter(delivery, exc.reason, handler="", exc=exc, attempt=1)
            return
        if envelope.message_type != sub.message_type:
            err = DecodeError(
                "unknown-message-type",
                f"{envelope.message_type} arrived on {sub.queue_name}, "
                f"which is for {sub.message_type}",
            )
            await self._dead_letter(delivery, err.reason, handler="", exc=err, attempt=1)
            return
        handlers = [h for h in sub.handlers if h.serves(envelope.version)]
        if not handlers:
            served = sorted({v for h in sub.handlers for v in h.versions})
            err = DecodeError(
                "unknown-version",
                f"{envelope.message_type} version {envelope.version} is served by no handler "
                f"of group {sub.group!r} (served versions: {served})",
            )
            await self._dead_letter(delivery, err.reason, handler="", exc=err, attempt=1)
            return
        if (
            not self._warned_priority
            and sub.queue.queue_type == "quorum"
            and delivery.priority not in (None, _NORMAL_PRIORITY)
        ):
            self._warned_priority = True
            self._log.warning(
                "priority_ignored",
                detail="this subscription's quorum queue has no priorities on RabbitMQ 3.10; "
                "subscribe with queue_type='classic' to honour them",
            )
        ctx = self._context(envelope, delivery)
        token = _current.set(ctx)
        try:
            await self._run_handlers(delivery, envelope, ctx, handlers)
        finally:
            _current.reset(token)

    def _context(self, envelope: Envelope, delivery: Delivery) -> MessageContext:
        sub = self.subscription
        return make_context(envelope, delivery, group=sub.group, auto_ack=sub.auto_ack)

    async def _run_handlers(
        self,
        delivery: Delivery,
        envelope: Envelope,
        ctx: MessageContext,
        handlers: list[HandlerSpec],
    ) -> None:
        done_before = delivery.headers.get(HEADER_HANDLED)
        done: list[str] = [str(n) for n in done_before] if isinstance(done_before, list) else []
        for handler in handlers:
            if handler.name in done:
                continue
            try:
                await self._attempt(handler, envelope.payload, ctx)
            except _Failure as failure:
                if delivery.settled:  # manual mode: the handler settled, then raised
                    self._log.error(
                        "handler_failed_after_settle",
                        handler=failure.handler,
                        message_id=ctx.id,
                        error=repr(failure.exc),
                    )
                    return
                await self._after_failure(delivery, ctx, failure, done)
                return
            done.append(handler.name)
        if not delivery.settled:
            if not self.subscription.auto_ack:
                self._log.warning(
                    "handler_did_not_settle",
                    message_id=ctx.id,
                    detail="auto_ack=False but the handler returned without ack/nack/reject; "
                    "acked because it succeeded",
                )
            await self._safe(delivery.ack(), delivery)

    async def _attempt(self, handler: HandlerSpec, payload: Message, ctx: MessageContext) -> None:
        """Run one handler, with the policy's immediate retries, or raise ``_Failure``."""
        policy = self.subscription.retry
        while True:
            ctx.handler = handler.name
            try:
                async with asyncio.timeout(self.subscription.timeout):
                    await handler.invoke(payload, ctx)
                return
            except TimeoutError as exc:
                error: BaseException = exc
                reason = "timeout"
                if not str(exc):
                    error = TimeoutError(
                        f"handler {handler.name} ran past its timeout of "
                        f"{self.subscription.timeout} s"
                    )
            except Exception as exc:
                error = exc
                reason = "handler-failed"
            if ctx.settled:
                raise _Failure(reason, handler.name, error)
            decision = policy.decide(ctx.attempt, error)
            if decision.action != "retry_now":
                raise _Failure(reason, handler.name, error)
            self._log.info(
                "retrying_now",
                handler=handler.name,
                message_id=ctx.id,
                attempt=ctx.attempt,
                error=repr(error),
            )
            ctx.attempt += 1

    async def _after_failure(
        self, delivery: Delivery, ctx: MessageContext, failure: _Failure, done: list[str]
    ) -> None:
        decision = self.subscription.retry.decide(ctx.attempt, failure.exc)
        if decision.action == "retry_later":
            try:
                await self._retry_later(delivery, ctx, decision.delay_s, done)
            except BanyanError as exc:
                self._log.error("retry_publish_failed", message_id=ctx.id, error=str(exc))
            else:
                self._log.warning(
                    "retry_scheduled",
                    handler=failure.handler,
                    message_id=ctx.id,
                    attempt=ctx.attempt,
                    delay_s=round(decision.delay_s, 3),
                    error=repr(failure.exc),
                )
                await self._safe(delivery.ack(), delivery)
                return
        await self._dead_letter(
            delivery, failure.reason, handler=failure.handler, exc=failure.exc, attempt=ctx.attempt
        )

    async def _retry_later(
        self, delivery: Delivery, ctx: MessageContext, delay_s: float, done: list[str]
    ) -> None:
        await self._ensure_delays()
        headers: Headers = dict(delivery.headers)
        headers[HEADER_ATTEMPT] = ctx.attempt + 1
        headers.setdefault(HEADER_FIRST_FAILURE, format_timestamp(datetime.now(UTC)))
        if done:
            headers[HEADER_HANDLED] = list[HeaderValue](done)
        strip_death_headers(headers)
        route = delay_route(max(1, round(delay_s * 1000)), self.subscription.queue_name)
        await self._transport.publish(
            route.exchange,
            route.routing_key,
            _republish(delivery, headers),
            confirm=True,
            mandatory=True,
        )

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        *,
        handler: str,
        exc: BaseException,
        attempt: int,
    ) -> None:
        """Move to the group's DLQ with the failure's details: confirmed publish, then ack."""
        sub = self.subscription
        now = format_timestamp(datetime.now(UTC))
        headers: Headers = dict(delivery.headers)
        strip_death_headers(headers)
        headers.update(
            {
                DLQ_REASON: reason,
                DLQ_EXCEPTION_TYPE: type(exc).__qualname__,
                DLQ_EXCEPTION_MESSAGE: str(exc)[:_TRACEBACK_LIMIT],
                DLQ_TRACEBACK: _trimmed_traceback(exc),
                HEADER_ATTEMPT: attempt,
                DLQ_HANDLER: handler,
                DLQ_GROUP: sub.group,
                DLQ_LAST_FAILURE: now,
                DLQ_ORIGINAL_EXCHANGE: delivery.exchange,
                DLQ_ORIGINAL_ROUTING_KEY: delivery.routing_key,
            }
        )
        headers.setdefault(HEADER_FIRST_FAILURE, now)
        try:
            await self._transport.publish(
                DEFAULT_EXCHANGE,
                sub.dlq_name,
                _republish(delivery, headers),
                confirm=True,
                mandatory=True,
            )
        except BanyanError as publish_error:
            # Could not write our record: let the broker dead-letter the original
            # (x-dead-letter-* on the queue). It lands in the same DLQ, without details.
            self._log.error(
                "dead_letter_publish_failed",
                message_id=delivery.message_id,
                reason=reason,
                error=str(publish_error),
            )
            await self._safe(delivery.reject(), delivery)
            return
        self._log.error(
            "dead_lettered",
            message_id=delivery.message_id,
            reason=reason,
            handler=handler,
            attempt=attempt,
            error=f"{type(exc).__qualname__}: {exc}"[:500],
        )
        await self._safe(delivery.ack(), delivery)

    async def _safe(self, settle: Coroutine[Any, Any, None], delivery: Delivery) -> None:
        """Settle, tolerating a lost channel: the broker then redelivers, nothing is lost."""
        try:
            await settle
        except (BanyanError, RuntimeError) as exc:
            self._log.warning("settle_failed", message_id=delivery.message_id, error=str(exc))


def make_context(
    envelope: Envelope, delivery: Delivery, *, group: str, auto_ack: bool = True
) -> MessageContext:
    headers = delivery.headers
    attempt = headers.get(HEADER_ATTEMPT, 1)
    delay = headers.get(HEADER_DELAY, 0)
    return MessageContext(
        id=envelope.id,
        message_type=envelope.message_type,
        version=envelope.version,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
        timestamp=envelope.timestamp,
        delay=delay if isinstance(delay, int) and not isinstance(delay, bool) else 0,
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
        service_name=envelope.service_name,
        headers=headers,
        group=group,
        delivery=delivery,
        auto_ack=auto_ack,
    )


# Headers RabbitMQ adds when it dead-letters. A republished message must not carry
# them: RabbitMQ 3.10 reads x-death to detect dead-letter cycles and would drop a
# retry's second trip through the same delay level.
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


def strip_death_headers(headers: Headers) -> None:
    for name in _DEATH_HEADERS:
        headers.pop(name, None)


def _republish(delivery: Delivery, headers: Headers) -> OutgoingMessage:
    return OutgoingMessage(
        body=delivery.body,
        message_id=delivery.message_id,
        correlation_id=delivery.correlation_id,
        message_type=delivery.message_type,
        timestamp=delivery.timestamp,
        headers=headers,
        priority=delivery.priority,
        content_type=delivery.content_type or "application/json",
    )


def _trimmed_traceback(exc: BaseException) -> str:
    if exc.__traceback__ is None:
        return ""
    text = "".join(traceback.format_exception(exc))
    if len(text) > _TRACEBACK_LIMIT:
        text = "…" + text[-_TRACEBACK_LIMIT:]
    return text
