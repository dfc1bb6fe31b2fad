"""Traces, metrics and log context on a real broker, with the OTel SDK's in-memory
exporter and metric reader (set once per process: OTel providers are global)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from banyan_bus import (
    Command,
    CommandHandler,
    Event,
    MessageBus,
    MessageContext,
    RetryPolicy,
)
from tests.support import wait_until

_exporter = InMemorySpanExporter()
_reader = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def otel_sdk() -> None:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    return _exporter


def counter(name: str, **labels: str) -> int:
    data = _reader.get_metrics_data()
    total = 0
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    if all(attrs.get(k) == v for k, v in labels.items()):
                        total += int(point.value)  # type: ignore[union-attr]
    return total


class BeaconLit(Event):
    beacon_id: str
    fail_times: int = 0


class SignalRelayed(Event):
    beacon_id: str


async def test_one_trace_spans_publisher_and_consumer(amqp_url: str, unique, spans) -> None:
    got: list[MessageContext] = []

    async def handle(event: BeaconLit, ctx: MessageContext) -> None:
        got.append(ctx)

    consumer = MessageBus(unique("watch"), amqp_url)
    await consumer.subscribe(BeaconLit, handle)
    publisher = MessageBus(unique("tower"), amqp_url)
    async with consumer, publisher:
        message_id = await publisher.publish(BeaconLit(beacon_id="b1"), correlation_id="cor_t1")
        await wait_until(lambda: len(got) == 1)
        await consumer.wait_idle(5)
    finished = spans.get_finished_spans()
    producer = [s for s in finished if s.name == "publish BeaconLit"]
    process = [s for s in finished if s.name == "process BeaconLit"]
    assert len(producer) == 1
    assert len(process) == 1
    p, c = producer[0], process[0]
    assert p.kind is SpanKind.PRODUCER
    assert c.kind is SpanKind.CONSUMER
    assert c.context.trace_id == p.context.trace_id
    assert c.parent is not None
    assert c.parent.span_id == p.context.span_id
    assert p.attributes["messaging.system"] == "rabbitmq"
    assert p.attributes["messaging.destination.name"] == "exchange.platform.events"
    assert p.attributes["messaging.rabbitmq.destination.routing_key"] == "beaconlit"
    assert p.attributes["messaging.message.id"] == message_id
    assert p.attributes["messaging.message.conversation_id"] == "cor_t1"
    assert c.attributes["messaging.message.id"] == message_id
    assert c.attributes["messaging.consumer.group.name"] == consumer.service
    assert c.attributes["messaging.operation.type"] == "process"
    assert c.attributes["messaging.message.conversation_id"] == "cor_t1"


async def test_failure_and_retry_show_in_spans_and_metrics(amqp_url: str, unique, spans) -> None:
    calls = 0

    async def handle(event: BeaconLit) -> None:
        nonlocal calls
        calls += 1
        if calls <= event.fail_times:
            raise RuntimeError("lamp broken")

    group = unique("watch")
    bus = MessageBus(group, amqp_url, retry=RetryPolicy(delayed=2, base=1, jitter=0))
    await bus.subscribe(BeaconLit, handle)
    base_published = counter("banyan.messages.published", **{"banyan.message.type": "BeaconLit"})
    async with bus:
        await bus.publish(BeaconLit(beacon_id="b2", fail_times=1))
        await bus.publish(BeaconLit(beacon_id="b3"))
        await bus.publish(BeaconLit(beacon_id="b4"))
        await wait_until(lambda: calls == 4, timeout=15)
        await bus.wait_idle(5)
    process = [s for s in spans.get_finished_spans() if s.name == "process BeaconLit"]
    failed = [s for s in process if s.status.status_code is StatusCode.ERROR]
    assert len(process) == 4
    assert len(failed) == 1
    assert [e.name for e in failed[0].events] == ["exception", "retry"]
    labels = {"banyan.message.type": "BeaconLit", "messaging.consumer.group.name": group}
    assert counter("banyan.messages.published", **{"banyan.message.type": "BeaconLit"}) == (
        base_published + 3
    )
    assert counter("banyan.messages.handled", **labels) == 3
    assert counter("banyan.messages.failed", **labels) == 1
    assert counter("banyan.messages.retried", **labels) == 1


class UserJoined(Event):
    user_id: str


class WelcomeMailed(Event):
    user_id: str


async def test_log_lines_carry_context_and_correlation_chains(amqp_url: str, unique) -> None:
    captured: list[dict[str, object]] = []

    def keep(_: object, __: str, event_dict: dict[str, object]) -> dict[str, object]:
        captured.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    try:
        contexts: dict[str, MessageContext] = {}
        email = MessageBus(unique("email"), amqp_url)
        analytics = MessageBus(unique("analytics"), amqp_url)
        users = MessageBus(unique("users"), amqp_url)

        async def send_welcome(event: UserJoined, ctx: MessageContext) -> None:
            contexts["email"] = ctx
            structlog.get_logger("email").info("sending welcome mail")
            await email.publish(WelcomeMailed(user_id=event.user_id))

        async def count(event: WelcomeMailed, ctx: MessageContext) -> None:
            contexts["analytics"] = ctx
            structlog.get_logger("analytics").info("counted")

        await email.subscribe(UserJoined, send_welcome)
        await analytics.subscribe(WelcomeMailed, count)
        async with email, analytics, users:
            first = await users.publish(UserJoined(user_id="u1"))
            await wait_until(lambda: "analytics" in contexts)
            await asyncio.sleep(0.1)
    finally:
        structlog.reset_defaults()
    line = next(c for c in captured if c.get("event") == "sending welcome mail")
    for field in (
        "event_id",
        "message_type",
        "version",
        "correlation_id",
        "causation_id",
        "trace_id",
        "span_id",
        "service",
        "group",
        "handler",
        "attempt",
    ):
        assert field in line, f"{field} missing from {line}"
    assert line["event_id"] == first
    assert line["message_type"] == "UserJoined"
    assert line["attempt"] == 1
    assert str(line["handler"]).endswith("send_welcome")
    # One correlation id through the chain; each step caused by the one before.
    assert contexts["email"].id == first
    assert contexts["analytics"].correlation_id == contexts["email"].correlation_id
    assert contexts["analytics"].causation_id == first
    counted = next(c for c in captured if c.get("event") == "counted")
    assert counted["correlation_id"] == contexts["email"].correlation_id
    assert counted["causation_id"] == first


class CheckLamp(Command):
    beacon_id: str


@CommandHandler(CheckLamp)
class CheckLampHandler:
    async def handle(self, command: CheckLamp) -> str:
        structlog.get_logger("lamps").info("checking lamp")
        return "ok"


async def test_command_handler_log_lines_carry_the_trace_attempt_and_version(
    amqp_url: str, unique, spans
) -> None:
    captured: list[dict[str, object]] = []

    def keep(_: object, __: str, event_dict: dict[str, object]) -> dict[str, object]:
        captured.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.contextvars.merge_contextvars, keep])
    try:
        owner = MessageBus(unique("lamps"), amqp_url)
        owner.include(CheckLampHandler)
        caller = MessageBus(unique("tower"), amqp_url)
        async with owner, caller:
            assert await caller.send(CheckLamp(beacon_id="b9"), timeout=10) == "ok"
    finally:
        structlog.reset_defaults()
    [server] = [s for s in spans.get_finished_spans() if s.name == "process CheckLamp"]
    assert server.kind is SpanKind.SERVER
    line = next(c for c in captured if c.get("event") == "checking lamp")
    assert line["trace_id"] == format(server.context.trace_id, "032x")
    assert line["span_id"] == format(server.context.span_id, "016x")
    assert line["attempt"] == 1
    assert line["version"] == 1
    assert line["message_type"] == "CheckLamp"
    assert line["group"] == owner.service
    assert str(line["handler"]).endswith("CheckLampHandler")


class LanternTrimmed(Event):
    lantern_id: str


async def test_a_skipped_duplicate_is_counted(amqp_url: str, unique) -> None:
    runs: list[str] = []

    async def trim(event: LanternTrimmed) -> None:
        runs.append(event.lantern_id)

    group = unique("lamplighters")
    bus = MessageBus(group, amqp_url)
    await bus.subscribe(LanternTrimmed, trim, idempotent=True)
    labels = {"banyan.message.type": "LanternTrimmed", "messaging.consumer.group.name": group}
    async with bus:
        for _ in range(3):  # one event, re-sent twice with its id: two duplicates
            await bus.publish(LanternTrimmed(lantern_id="l1"), message_id="evt_lantern_1")
        await wait_until(
            lambda: counter("banyan.messages.deduplicated", **labels) == 2,
            timeout=10,
            what="two counted duplicates",
        )
    assert runs == ["l1"]
