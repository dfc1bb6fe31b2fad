"""The consumer engine: decode, run handlers, and settle every delivery exactly once.

Per delivery, in order:

1. decode the envelope; a message that cannot be decoded is dead-lettered at
   once (retrying cannot fix it);
2. run the group's handlers that serve the message's version (or the older
   version it reads as: ``handlers.VersionReader``), in definition order,
   each bounded by ``timeout`` and by the subscription's ``concurrency``;
3. on success ack; on failure ask the ``RetryPolicy``: run again now, send
   back through the delay levels to *this group's* exchange with ``x-attempt``
   + 1, or move to the DLQ with the failure's details. The original is acked
   only after that publish was confirmed; if it cannot be, the broker's own
   dead-lettering (``reject``) still puts it in the DLQ. Nothing is dropped.

Handlers that already succeeded for a message are named in the
``x-banyan-handled`` header of its retry, so a retry runs only the handler
that failed and those after it. The header is believed only on the bus's own
retry route (``deadletter.handled_before``: anyone can write a header), and
every skip is logged (``handler_skipped``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog
from opentelemetry.trace import SpanKind

from banyan_bus.context import MessageContext, current_context
from banyan_bus.contracts import ContractRegistry, Message
from banyan_bus.deadletter import (
    HEADER_FIRST_FAILURE,
    handled_before,
    republish,
    set_handled,
    strip_death_headers,
    write_record,
)
from banyan_bus.deadlines import DeadlineExceeded
from banyan_bus.delay import delay_route
from banyan_bus.delivery import DeliveryConsumer, timeout_error
from banyan_bus.envelope import (
    HEADER_ATTEMPT,
    PRIORITY_LEVELS,
    DecodeError,
    Envelope,
    format_timestamp,
)
from banyan_bus.errors import BanyanError
from banyan_bus.handlers import HandlerSpec
from banyan_bus.idempotency import Deduplicator, IdempotencyKeyBusy, IdempotencyStoreError
from banyan_bus.logcontext import bind_handler_log_context
from banyan_bus.retry import RetryDecision
from banyan_bus.subscription import Subscription
from banyan_bus.telemetry import Telemetry, fail
from banyan_bus.transport.base import Delivery, Headers, Transport
from banyan_bus.versions import VersionReader

__all__ = ["BUSY_RETRY_DELAY_S", "Subscription", "SubscriptionConsumer"]

log = structlog.get_logger("banyan_bus.consume")

_NORMAL_PRIORITY = PRIORITY_LEVELS["normal"]


class _Failure(Exception):
    """A handler attempt failed for good here; carries the decision and the DLQ details."""

    def __init__(
        self, reason: str, handler: str, exc: BaseException, decision: RetryDecision
    ) -> None:
        super().__init__(str(exc))
        self.reason = reason
        self.handler = handler
        self.exc = exc
        self.decision = decision


#: How long a duplicate waits when another worker holds its idempotency claim.
BUSY_RETRY_DELAY_S = 5.0


class SubscriptionConsumer(DeliveryConsumer):
    """Runs one subscription on one transport connection."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        transport: Transport,
        registry: ContractRegistry,
        ensure_delays: Callable[[], Coroutine[Any, Any, None]],
        telemetry: Telemetry,
        service: str,
        max_message_size: int,
    ) -> None:
        # The semaphore is skipped where it could never block: with automatic acks
        # a delivery holds its prefetch slot until its handlers are done, so the
        # prefetch already bounds how many run (manual acks can free it earlier).
        bounded_by_prefetch = subscription.auto_ack and subscription.concurrency >= (
            subscription.prefetch * len(subscription.queue_names)
        )
        super().__init__(
            transport=transport,
            telemetry=telemetry,
            service=service,
            group=subscription.group,
            message_type=subscription.message_type,
            concurrency=None if bounded_by_prefetch else subscription.concurrency,
            timeout=subscription.timeout,
            auto_ack=subscription.auto_ack,
            destination=subscription.queue_name,
            span_kind=SpanKind.CONSUMER,
            log=log.bind(group=subscription.group, message_type=subscription.message_type),
        )
        self.subscription = subscription
        self._queue_name = subscription.queue_name  # a property that formats it each time
        self._max_message_size = max_message_size
        self._registry = registry
        self._ensure_delays = ensure_delays
        self._warned_priority = False
        # How each version is read (directly, or tolerantly as an older one) and by
        # which handlers: worked out once per version, not per message.
        self._reader = VersionReader(
            subscription.message_type, subscription.handlers, registry, subscription.group
        )

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Consume the subscription's queue. An ordered subscription is not started on
        its own: its group's ``OrderedStreamConsumer`` hands it its deliveries."""
        sub = self.subscription
        if sub.ordered:
            raise RuntimeError(
                f"{sub.message_type} in {sub.group!r} is ordered: OrderedStreamConsumer runs it"
            )
        for queue in sub.queue_names:
            self._consumers.append(
                await self._transport.consume(queue, self._on_delivery, prefetch=sub.prefetch)
            )

    # -- per delivery (DeliveryConsumer runs the frame: tasks, context, span, logs) ----

    def _admit(self, delivery: Delivery) -> Envelope | DecodeError:
        sub = self.subscription
        if len(delivery.body) > self._max_message_size:
            return DecodeError(
                "too-large",
                f"body is {len(delivery.body)} bytes, over this service's limit of "
                f"{self._max_message_size} bytes",
            )
        envelope = self._reader.read(delivery)
        if isinstance(envelope, DecodeError):
            return envelope
        if envelope.message_type != sub.message_type:
            return DecodeError(
                "unknown-message-type",
                f"{envelope.message_type} arrived on {sub.queue_name}, "
                f"which is for {sub.message_type}",
            )
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
        return envelope

    async def _refuse(self, delivery: Delivery, error: DecodeError) -> None:
        """Retrying cannot fix what cannot be decoded or served here: to the DLQ at once."""
        await self._dead_letter(delivery, error.reason, handler="", exc=error, attempt=1)

    async def _run(self, delivery: Delivery, envelope: Envelope, ctx: MessageContext) -> None:
        handlers = self._reader.handlers(envelope)  # the version _admit read it as
        done, trusted = handled_before(delivery, self._queue_name)
        if not trusted:
            self._log.warning(
                "handled_header_ignored",
                message_id=ctx.id,
                claimed=done[:20],
                detail="x-banyan-handled is honoured only on the bus's own retry route; "
                "every handler runs",
            )
            done = []
        dedup = self.subscription.dedup
        for handler in handlers:
            if handler.name in done:
                self._log.info(
                    "handler_skipped",
                    handler=handler.name,
                    message_id=ctx.id,
                    attempt=ctx.attempt,
                    reason="succeeded-before-retry",
                )
                continue
            try:
                if dedup is None:
                    await self._attempt(handler, envelope.payload, ctx)
                elif not await self._attempt_once(dedup, handler, envelope, ctx):
                    await self._come_back_later(delivery, ctx, handler.name, done)
                    return
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
        """Run one handler with the retries that happen here, or raise ``_Failure``.

        Immediate retries run here. An ordered subscription also waits out its
        delayed retries here, holding the message, so that its key's later
        messages cannot overtake it.
        """
        policy = self.subscription.retry
        ordered = self.subscription.ordered
        telemetry = self._telemetry
        labels = {**self._labels, "banyan.handler": handler.name} if telemetry.enabled else None
        deadlines = self._deadlines
        while True:
            ctx.handler = handler.name
            bind_handler_log_context(handler.name, ctx.attempt)
            started = 0.0
            if labels is not None:
                started = time.perf_counter()
                telemetry.in_flight.add(1, labels)
            try:
                if deadlines is None:
                    await handler.invoke(payload, ctx)
                else:
                    await deadlines.bounded(handler.invoke(payload, ctx), handler.name)
                if labels is not None:
                    telemetry.handled.add(1, labels)
                return
            except DeadlineExceeded as exc:
                error: BaseException = timeout_error(exc)
                reason = "timeout"
            except Exception as exc:
                error = exc
                reason = "handler-failed"
            finally:
                if labels is not None:
                    telemetry.in_flight.add(-1, labels)
                    telemetry.duration.record(time.perf_counter() - started, labels)
            if labels is not None:
                telemetry.failed.add(1, labels)
            decision = policy.decide(ctx.attempt, error)
            in_place = decision.action == "retry_now" or (
                ordered and decision.action == "retry_later"
            )
            if ctx.settled or not in_place:
                raise _Failure(reason, handler.name, error, decision)
            fail(ctx.span, error, event="retry", attempt=ctx.attempt, delay_s=decision.delay_s)
            if labels is not None:
                telemetry.retried.add(1, labels)
            self._log.info(
                "retrying_in_place",
                handler=handler.name,
                message_id=ctx.id,
                attempt=ctx.attempt,
                delay_s=round(decision.delay_s, 3),
                error=repr(error),
            )
            if decision.delay_s:
                await asyncio.sleep(decision.delay_s)
            ctx.attempt += 1

    async def _after_failure(
        self, delivery: Delivery, ctx: MessageContext, failure: _Failure, done: list[str]
    ) -> None:
        decision = failure.decision
        if decision.action == "retry_later":
            try:
                await self._retry_later(delivery, ctx, decision.delay_s, done)
            except BanyanError as exc:
                self._log.error("retry_publish_failed", message_id=ctx.id, error=str(exc))
            else:
                fail(
                    ctx.span,
                    failure.exc,
                    event="retry",
                    attempt=ctx.attempt,
                    delay_s=decision.delay_s,
                    handler=failure.handler,
                )
                if self._telemetry.enabled:
                    self._telemetry.retried.add(1, self._labels)
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
            delivery,
            failure.reason,
            handler=failure.handler,
            exc=failure.exc,
            attempt=ctx.attempt,
            handled=done,
        )

    async def _attempt_once(
        self,
        dedup: Deduplicator[Message],
        handler: HandlerSpec,
        envelope: Envelope,
        ctx: MessageContext,
    ) -> bool:
        """``_attempt`` under an idempotency claim; False if it must come back later.

        A key another worker is running (or a store that is down) is not a failed
        attempt. An ordered subscription waits for it in place, to keep its key's
        order; any other sends the message around again later.
        """
        while True:
            try:
                async with dedup.guard(handler.name, envelope.id, envelope.payload) as outcome:
                    if outcome == "run":
                        await self._attempt(handler, envelope.payload, ctx)
                    else:
                        self._log.info("duplicate_skipped", handler=handler.name, message_id=ctx.id)
                        self._telemetry.deduplicated.add(1, self._labels)
                return True
            except (IdempotencyKeyBusy, IdempotencyStoreError) as exc:
                self._log.info(
                    "idempotency_busy", handler=handler.name, message_id=ctx.id, error=str(exc)
                )
                if not self.subscription.ordered:
                    return False
                await asyncio.sleep(BUSY_RETRY_DELAY_S)

    async def _come_back_later(
        self, delivery: Delivery, ctx: MessageContext, handler: str, done: list[str]
    ) -> None:
        try:
            # Not a failed attempt: the same attempt comes back, with no failure time.
            await self._retry_later(
                delivery, ctx, BUSY_RETRY_DELAY_S, done, next_attempt=ctx.attempt, failed=False
            )
        except BanyanError as publish_error:
            self._log.error("retry_publish_failed", message_id=ctx.id, error=str(publish_error))
            await self._safe(delivery.nack(requeue=True), delivery)
            return
        await self._safe(delivery.ack(), delivery)

    async def _retry_later(
        self,
        delivery: Delivery,
        ctx: MessageContext,
        delay_s: float,
        done: list[str],
        *,
        next_attempt: int | None = None,
        failed: bool = True,
    ) -> None:
        await self._ensure_delays()
        headers: Headers = dict(delivery.headers)
        headers[HEADER_ATTEMPT] = ctx.attempt + 1 if next_attempt is None else next_attempt
        if failed:
            headers.setdefault(HEADER_FIRST_FAILURE, format_timestamp(datetime.now(UTC)))
        set_handled(headers, done)  # drops a header that was not believed
        strip_death_headers(headers)
        route = delay_route(max(1, round(delay_s * 1000)), self.subscription.queue_name)
        await self._transport.publish(
            route.exchange,
            route.routing_key,
            republish(delivery, headers),
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
        handled: list[str] | None = None,
    ) -> None:
        """Move to the group's DLQ with the failure's details: confirmed publish, then ack."""
        sub = self.subscription
        try:
            await write_record(
                self._transport,
                sub.dlq_name,
                delivery,
                reason,
                exc=exc,
                handler=handler,
                group=sub.group,
                attempt=attempt,
                handled=handled or (),
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
        span = current_context_span()
        fail(span, exc, event="dead-lettered", reason=reason, handler=handler, attempt=attempt)
        if self._telemetry.enabled:
            self._telemetry.dead_lettered.add(1, {**self._labels, "banyan.reason": reason})
        self._log.error(
            "dead_lettered",
            message_id=delivery.message_id,
            reason=reason,
            handler=handler,
            attempt=attempt,
            error=f"{type(exc).__qualname__}: {exc}"[:500],
        )
        await self._safe(delivery.ack(), delivery)


def current_context_span() -> Any:
    ctx = current_context()
    return None if ctx is None else ctx.span
