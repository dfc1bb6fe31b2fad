"""OpenTelemetry traces and metrics, on the API only: the SDK is the user's choice.

One PRODUCER span per publish (``publish UserCreated``) and one CONSUMER span
per handling (``process UserCreated``), with the messaging semantic
conventions' attributes. The W3C trace context travels twice: in the AMQP
headers (``traceparent``/``tracestate``, for any OTel-instrumented consumer)
and in the envelope's ``traceContext`` (for consumers that only keep bodies,
such as a DLQ dump). Retries and dead-lettering are span events.

When no SDK is configured, ``enabled`` is False and the hot path does nothing
here beyond one attribute check: every microsecond per message shows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from banyan_bus.context import MessageContext
from banyan_bus.envelope import HEADER_TRACEPARENT, HEADER_TRACESTATE, TraceContext
from banyan_bus.transport.base import Headers

_SCOPE = "banyan_bus"
_OFF: AbstractContextManager[None] = nullcontext()  # reusable: what a span is when tracing is off

# Messaging semantic conventions (attribute names as the spec spells them).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
CONSUMER_GROUP = "messaging.consumer.group.name"
BODY_SIZE = "messaging.message.body.size"
MESSAGE_TYPE = "banyan.message.type"
MESSAGE_VERSION = "banyan.message.version"
ATTEMPT = "banyan.attempt"


def _sdk_configured() -> bool:
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    return not (
        type(tracer_provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider")
        and type(meter_provider).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider")
    )


class Telemetry:
    """A bus's tracer, meter and instruments; built at ``bus.start()``."""

    def __init__(self, service: str, system: str) -> None:
        self.service = service
        self.system = system
        self.enabled = _sdk_configured()
        self.tracer = trace.get_tracer(_SCOPE)
        meter = metrics.get_meter(_SCOPE)
        self.published = meter.create_counter(
            "banyan.messages.published", unit="{message}", description="Messages published"
        )
        self.handled = meter.create_counter(
            "banyan.messages.handled", unit="{message}", description="Handler runs that succeeded"
        )
        self.failed = meter.create_counter(
            "banyan.messages.failed", unit="{message}", description="Handler runs that failed"
        )
        self.retried = meter.create_counter(
            "banyan.messages.retried", unit="{message}", description="Retries scheduled"
        )
        self.dead_lettered = meter.create_counter(
            "banyan.messages.dead_lettered",
            unit="{message}",
            description="Messages moved to a dead-letter queue",
        )
        self.deduplicated = meter.create_counter(
            "banyan.messages.deduplicated",
            unit="{message}",
            description="Duplicates acked without running the handler",
        )
        self.duration = meter.create_histogram(
            "banyan.handler.duration", unit="s", description="Handler run time"
        )
        self.latency = meter.create_histogram(
            "banyan.message.latency",
            unit="s",
            description="From publish time to the end of handling",
        )
        self.in_flight = meter.create_up_down_counter(
            "banyan.handlers.in_flight", unit="{handler}", description="Handlers running now"
        )

    # -- producer -------------------------------------------------------------------

    def publish_span(
        self,
        *,
        message_type: str,
        exchange: str,
        routing_key: str,
        headers: Headers,
        kind: SpanKind = SpanKind.PRODUCER,
        operation: str = "publish",
    ) -> AbstractContextManager[Span | None]:
        """A PRODUCER span; injects its context into ``headers`` (``traceparent``)."""
        if not self.enabled:
            return _OFF  # no generator, no span: this runs for every publish
        return self._publish_span(
            message_type=message_type,
            exchange=exchange,
            routing_key=routing_key,
            headers=headers,
            kind=kind,
            operation=operation,
        )

    @contextmanager
    def _publish_span(
        self,
        *,
        message_type: str,
        exchange: str,
        routing_key: str,
        headers: Headers,
        kind: SpanKind = SpanKind.PRODUCER,
        operation: str = "publish",
    ) -> Iterator[Span | None]:
        with self.tracer.start_as_current_span(
            f"{operation} {message_type}",
            kind=kind,
            attributes={
                SYSTEM: self.system,
                OPERATION_TYPE: "send" if kind is SpanKind.CLIENT else "publish",
                OPERATION_NAME: operation,
                DESTINATION: exchange,
                ROUTING_KEY: routing_key,
                MESSAGE_TYPE: message_type,
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            headers.update(carrier)
            yield span

    @staticmethod
    def trace_context(
        span: Span | None, headers: Headers, handling: MessageContext | None
    ) -> dict[str, str]:
        """The envelope's ``traceContext`` for a publish: always a valid W3C context.

        The platform's envelope always carries one, and its TypeScript services read
        ``env.traceContext.traceId`` unguarded, so there is one with or without an
        OpenTelemetry SDK. With a recording (or propagated) span, it is that span's.
        Without one, a publish inside a handler (``handling``: the context of the
        message being handled, which the caller has already looked up) continues the
        incoming trace (same trace id and flags, a new span id) so the trace survives
        a Python hop; any other publish starts a trace. ``headers`` gets the matching
        ``traceparent`` when the SDK did not already write one.
        """
        if span is not None:
            sc = span.get_span_context()
            if sc.is_valid:
                return {
                    "traceId": format(sc.trace_id, "032x"),
                    "spanId": format(sc.span_id, "016x"),
                    "traceFlags": format(int(sc.trace_flags), "02x"),
                }
        parent = _incoming_trace(handling)
        trace_id, flags = parent if parent is not None else (os.urandom(16).hex(), "01")
        span_id = os.urandom(8).hex()
        headers.setdefault(HEADER_TRACEPARENT, f"00-{trace_id}-{span_id}-{flags}")
        return {"traceId": trace_id, "spanId": span_id, "traceFlags": flags}

    # -- consumer -------------------------------------------------------------------

    def process_span(
        self,
        *,
        message_type: str,
        version: int,
        message_id: str,
        correlation_id: str | None,
        group: str,
        destination: str,
        headers: Headers,
        envelope_trace: TraceContext | None,
        body_size: int,
        kind: SpanKind = SpanKind.CONSUMER,
    ) -> AbstractContextManager[Span | None]:
        """A CONSUMER span, child of the publisher's span (from headers or envelope)."""
        if not self.enabled:
            return _OFF
        return self._process_span(
            message_type=message_type,
            version=version,
            message_id=message_id,
            correlation_id=correlation_id,
            group=group,
            destination=destination,
            headers=headers,
            envelope_trace=envelope_trace,
            body_size=body_size,
            kind=kind,
        )

    @contextmanager
    def _process_span(
        self,
        *,
        message_type: str,
        version: int,
        message_id: str,
        correlation_id: str | None,
        group: str,
        destination: str,
        headers: Headers,
        envelope_trace: TraceContext | None,
        body_size: int,
        kind: SpanKind = SpanKind.CONSUMER,
    ) -> Iterator[Span | None]:
        parent = _extract(headers, envelope_trace)
        token = otel_context.attach(parent)
        try:
            with self.tracer.start_as_current_span(
                f"process {message_type}",
                kind=kind,
                attributes={
                    SYSTEM: self.system,
                    OPERATION_TYPE: "process",
                    OPERATION_NAME: "process",
                    DESTINATION: destination,
                    MESSAGE_ID: message_id,
                    CONVERSATION_ID: correlation_id or "",
                    CONSUMER_GROUP: group,
                    MESSAGE_TYPE: message_type,
                    MESSAGE_VERSION: version,
                    BODY_SIZE: body_size,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                yield span
        finally:
            otel_context.detach(token)


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_FLAGS = re.compile(r"^[0-9a-f]{2}$")
_NO_TRACE = "0" * 32


def _incoming_trace(ctx: MessageContext | None) -> tuple[str, str] | None:
    """(trace id, flags) of the message being handled: its envelope's, else its header's."""
    if ctx is None:
        return None
    trace = ctx.trace_context  # from the wire: anything may be in it
    if trace is not None:
        trace_id, flags = trace.trace_id.lower(), trace.trace_flags.lower()
        if _TRACE_ID.match(trace_id) and trace_id != _NO_TRACE:
            return trace_id, flags if _FLAGS.match(flags) else "01"
    value = ctx.headers.get(HEADER_TRACEPARENT)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        match = _TRACEPARENT.match(value.strip().lower())
        if match and match[1] != _NO_TRACE:
            return match[1], match[2]
    return None


def _extract(headers: Headers, envelope_trace: TraceContext | None) -> otel_context.Context:
    carrier: dict[str, str] = {}
    for name in (HEADER_TRACEPARENT, HEADER_TRACESTATE):
        value = headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            carrier[name] = value
    if HEADER_TRACEPARENT not in carrier and envelope_trace is not None:
        carrier[HEADER_TRACEPARENT] = (
            f"00-{envelope_trace.trace_id}-{envelope_trace.span_id}-{envelope_trace.trace_flags}"
        )
    return propagate.extract(carrier)


def fail(span: Span | None, exc: BaseException, *, event: str | None = None, **attrs: Any) -> None:
    """Mark ``span`` failed with ``exc``; optionally add a span event (retry, dead-letter)."""
    if span is None:
        return
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
    if event:
        span.add_event(event, attributes=_clean(attrs))


def _clean(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if isinstance(v, (str, int, float, bool))}


def span_ids(span: Span | None) -> tuple[str | None, str | None]:
    """(trace id, span id) as hex for log lines; Nones when not tracing."""
    if span is None:
        return None, None
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
