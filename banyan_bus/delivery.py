"""One delivery, from the transport's callback to its settlement: what events and commands share.

Both consumers - ``consume.SubscriptionConsumer`` (a group's events) and
``rpc.CommandConsumer`` (a service's commands and queries) - receive
deliveries the same way and owe each one the same things:

- **task tracking and a bounded shutdown**: shutdown stops consuming and at
  once returns to the queue every delivery whose handler has not started
  (prefetched, or waiting for a concurrency slot); it waits for the running
  handlers (the grace period), then cancels the rest and waits at most
  :data:`CANCEL_WAIT_S` for them. A handler that ignores the cancellation is
  abandoned: logged by message id and handler, its delivery nacked back to the
  queue (and the broker requeues it anyway when the connection closes), so
  ``stop()`` returns whatever a handler does and nothing is lost;
- **back-pressure**: at most ``concurrency`` handlers at once (no semaphore
  where the prefetch already bounds them: it could never block);
- **context**: a :class:`MessageContext` as ``current_context()``, a span that
  continues the publisher's trace, and the fields DESIGN.md §4 promises on every
  log line inside a handler (event id, message type, version, correlation and
  causation ids, trace and span ids, service, group, handler, attempt);
- **time limits**: one :class:`Deadlines` timer per consumer, not one per attempt;
- **safe settling**: an ack or nack on a lost channel is logged, not raised
  (the broker redelivers the message anyway).

:class:`DeliveryConsumer` does these once. A subclass says what a delivery must
be to be handled (``_admit``), what becomes of one that is not (``_refuse``:
the DLQ for an event, an error reply for a command) and how its handlers run
(``_run``).

This is the consume hot path (benchmarks/README.md, "What the profiles
showed"): per delivery, one task, no context manager beyond the span (a shared
no-op when tracing is off), prebuilt log-context variables, no extra await.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog
from opentelemetry.trace import SpanKind

from banyan_bus.context import MessageContext, _current
from banyan_bus.deadlines import DeadlineExceeded, Deadlines
from banyan_bus.envelope import HEADER_ATTEMPT, HEADER_DELAY, DecodeError, Envelope
from banyan_bus.errors import BanyanError
from banyan_bus.logcontext import bind_message_log_context
from banyan_bus.telemetry import CONSUMER_GROUP, MESSAGE_TYPE, Telemetry, span_ids
from banyan_bus.transport.base import Consumer, Delivery, Transport

#: How long shutdown waits for cancelled handlers to end before abandoning them
#: (and, when it abandoned some, for the connection to close: see ``MessageBus.stop``).
CANCEL_WAIT_S = 0.5
#: How long shutdown waits for the broker to take back an abandoned delivery.
_RETURN_WAIT_S = 1.0


class InFlight:
    """One delivery being handled: its task, and its context once handling started."""

    __slots__ = ("ctx", "delivery", "started")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.started = False  # False while prefetched or waiting for a concurrency slot
        self.ctx: MessageContext | None = None

    @property
    def handler(self) -> str | None:
        return None if self.ctx is None else self.ctx.handler

    @property
    def message_id(self) -> str | None:
        return self.delivery.message_id if self.ctx is None else self.ctx.id


class HandlerTasks:
    """The tasks handling one consumer's deliveries.

    Shutdown (:meth:`close`) returns the deliveries whose handler has not
    started, waits for the others (the grace period), then cancels the rest
    and waits a bounded time (:meth:`cancel_and_wait`); a cancelled handler
    returns its message to the queue, so nothing is lost.
    """

    __slots__ = ("_tasks", "closing")

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], InFlight] = {}
        #: Set at shutdown: a delivery whose handler has not started goes back at once.
        self.closing = False

    def __len__(self) -> int:
        return len(self._tasks)

    def add_current(self, delivery: Delivery) -> tuple[asyncio.Task[Any] | None, InFlight]:
        task = asyncio.current_task()
        entry = InFlight(delivery)
        if task is not None:
            self._tasks[task] = entry
        return task, entry

    def discard(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.pop(task, None)

    def close(self) -> int:
        """Stop handling: cancel every delivery whose handler has not started (each
        returns its message to the queue); later ones are returned on arrival.
        Returns how many were cancelled."""
        self.closing = True
        unstarted = [task for task, entry in self._tasks.items() if not entry.started]
        for task in unstarted:
            task.cancel()
        return len(unstarted)

    def running(self) -> list[InFlight]:
        """The deliveries whose handlers are running now."""
        return [entry for task, entry in self._tasks.items() if not task.done()]

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until none is running; False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            return False
        return True

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def cancel_and_wait(self, timeout: float = CANCEL_WAIT_S) -> list[InFlight]:
        """Cancel every task and wait at most ``timeout`` s for them to end.

        Returns the deliveries whose handlers are still running after that
        (they ignored the cancellation): the caller abandons them. Never
        unbounded: a handler that catches ``CancelledError`` and goes on must
        not hold up shutdown.
        """
        self.closing = True
        self.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return self.running()


def make_context(
    envelope: Envelope, delivery: Delivery, *, group: str, auto_ack: bool = True
) -> MessageContext:
    """The context a handler sees: the envelope's fields, attempt and delay from headers."""
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
        trace_context=envelope.trace_context,
    )


def timeout_error(exc: DeadlineExceeded) -> TimeoutError:
    """A handler's deadline as a plain ``TimeoutError``, with the cancelled handler's stack.

    What a DLQ record, a span and a command's error reply show: the handler
    timed out, and where it was when it was cancelled.
    """
    cancelled = exc.__cause__
    error = TimeoutError(str(exc))
    error.__cause__ = cancelled
    error.__traceback__ = None if cancelled is None else cancelled.__traceback__
    return error


class DeliveryConsumer(ABC):
    """Consumes one message type for one group on one transport connection.

    ``concurrency=None`` means the prefetch alone bounds the running handlers;
    ``timeout=None`` means handlers run unbounded. ``destination`` names the
    span's destination when a delivery does not say which exchange it came from.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        telemetry: Telemetry,
        service: str,
        group: str,
        message_type: str,
        concurrency: int | None,
        timeout: float | None,
        auto_ack: bool,
        destination: str,
        span_kind: SpanKind,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._transport = transport
        self._telemetry = telemetry
        self._service = service
        self._group = group
        self._auto_ack = auto_ack
        self._destination = destination
        self._span_kind = span_kind
        self._labels = {MESSAGE_TYPE: message_type, CONSUMER_GROUP: group}
        self._semaphore = None if concurrency is None else asyncio.Semaphore(concurrency)
        self._deadlines = None if timeout is None else Deadlines(timeout, "handler")
        self._consumers: list[Consumer] = []
        self._tasks = HandlerTasks()
        self._log = log

    # -- lifecycle ------------------------------------------------------------------

    async def stop_consuming(self) -> None:
        """Stop taking new messages; running handlers go on, and deliveries whose
        handler has not started go back to the queue now (not run first)."""
        consumers, self._consumers = self._consumers, []
        returned = self._tasks.close()
        for consumer in consumers:
            await consumer.cancel()
        if returned:
            self._log.info(
                "unstarted_returned",
                count=returned,
                detail="prefetched deliveries whose handler had not started go back to the queue",
            )

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        return await self._tasks.wait_idle(timeout)

    async def cancel_in_flight(self, timeout: float = CANCEL_WAIT_S) -> None:
        """Cancel the running handlers (their messages go back to the queue); wait at
        most ``timeout`` s, then abandon those that ignore it, returning their messages."""
        for entry in self._tasks.running():
            self._log.warning(
                "handler_cancelled_at_shutdown",
                message_id=entry.message_id,
                handler=entry.handler,
                detail="the grace period is over; the message goes back to its queue",
            )
        stuck = await self._tasks.cancel_and_wait(timeout)
        for entry in stuck:
            delivery = entry.delivery
            self._log.error(
                "handler_abandoned",
                message_id=entry.message_id,
                handler=entry.handler,
                detail=f"ignored cancellation for {timeout} s; shutdown goes on without it "
                "and its message goes back to the queue (it may still be running)",
            )
            if delivery.settled or delivery.stale:
                continue
            try:
                async with asyncio.timeout(_RETURN_WAIT_S):
                    await delivery.nack(requeue=True)
            except (BanyanError, TimeoutError) as exc:  # closing the connection returns it
                self._log.warning("settle_failed", message_id=delivery.message_id, error=repr(exc))

    # -- per delivery ---------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        tasks = self._tasks
        if tasks.closing:  # shutting down: back to the queue, not run first
            if not delivery.stale:
                await self._safe(delivery.nack(requeue=True), delivery)
            return
        task, entry = tasks.add_current(delivery)
        try:
            if self._semaphore is None:
                if not delivery.stale:  # else its connection is gone: redelivered elsewhere
                    entry.started = True
                    await self._handle(delivery, entry)
            else:
                async with self._semaphore:
                    if tasks.closing:  # a slot came free during shutdown: do not start
                        if not delivery.stale:
                            await self._safe(delivery.nack(requeue=True), delivery)
                    elif not delivery.stale:
                        entry.started = True
                        await self._handle(delivery, entry)
        except asyncio.CancelledError:
            if not delivery.settled and not delivery.stale:
                await self._safe(delivery.nack(requeue=True), delivery)
            raise
        except Exception:  # a bug in the engine itself: never lose the message
            self._log.exception("consumer_error", message_id=delivery.message_id)
            if not delivery.settled:
                await self._safe(delivery.nack(requeue=True), delivery)
        finally:
            tasks.discard(task)

    async def _handle(self, delivery: Delivery, entry: InFlight) -> None:
        admitted = self._admit(delivery)
        if isinstance(admitted, DecodeError):
            await self._refuse(delivery, admitted)
            return
        envelope = admitted
        ctx = self._context(envelope, delivery)
        entry.ctx = ctx  # names its handler if shutdown has to abandon it
        token = _current.set(ctx)
        telemetry = self._telemetry
        try:
            with telemetry.process_span(
                message_type=envelope.message_type,
                version=envelope.version,
                message_id=envelope.id,
                correlation_id=envelope.correlation_id,
                group=self._group,
                destination=delivery.exchange or self._destination,
                headers=delivery.headers,
                envelope_trace=envelope.trace_context,
                body_size=len(delivery.body),
                kind=self._span_kind,
            ) as span:
                ctx.span = span
                trace_id, span_id = span_ids(span)
                if trace_id is None and envelope.trace_context is not None:
                    trace_id = envelope.trace_context.trace_id
                # Each delivery runs in its own task, whose context dies with it, so
                # binding without a reset is safe and saves a context snapshot per
                # message (an ordered chain rebinds every key for its next message).
                bind_message_log_context(
                    envelope.id,
                    envelope.message_type,
                    envelope.version,
                    envelope.correlation_id,
                    envelope.causation_id,
                    trace_id,
                    span_id,
                    self._service,
                    self._group,
                )
                await self._run(delivery, envelope, ctx)
            if telemetry.enabled:
                latency = (datetime.now(UTC) - envelope.timestamp).total_seconds()
                telemetry.latency.record(max(latency, 0.0), self._labels)
        finally:
            _current.reset(token)

    def _context(self, envelope: Envelope, delivery: Delivery) -> MessageContext:
        return make_context(envelope, delivery, group=self._group, auto_ack=self._auto_ack)

    @abstractmethod
    def _admit(self, delivery: Delivery) -> Envelope | DecodeError:
        """The delivery's envelope if it can be handled here, else why not."""

    @abstractmethod
    async def _refuse(self, delivery: Delivery, error: DecodeError) -> None:
        """Settle a delivery that ``_admit`` turned away."""

    @abstractmethod
    async def _run(self, delivery: Delivery, envelope: Envelope, ctx: MessageContext) -> None:
        """Run the handlers (``ctx`` is current, the span and log context are bound) and settle."""

    async def _safe(self, settle: Coroutine[Any, Any, None], delivery: Delivery) -> None:
        """Settle, tolerating a lost channel: the broker then redelivers, nothing is lost."""
        try:
            await settle
        except BanyanError as exc:
            self._log.warning("settle_failed", message_id=delivery.message_id, error=str(exc))
